"""Every failure under a view becomes a JSON response in the OpenAI error shape, with the right status."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from appliance.errors import APIError

log = logging.getLogger(__name__)


def error_response(error: APIError):
    logged = g.get("logged_request")
    if logged is not None:
        logged.fail(error)  # its row ends with this error
    response = jsonify(error.body())
    response.status_code = error.status
    if getattr(error, "retry_after", None):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _http_error(exc: HTTPException):
    kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
    error = APIError(exc.description or exc.name, code=exc.name.lower().replace(" ", "_"), status=exc.code)
    error.type = kind
    return error_response(error)


def _unexpected(exc: Exception):
    log.exception("unhandled error")
    error = APIError(f"internal error: {exc.__class__.__name__}: {exc}", code="internal_error", status=500)
    error.type = "server_error"
    return error_response(error)


def init_app(app: Flask) -> None:
    app.register_error_handler(APIError, error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
