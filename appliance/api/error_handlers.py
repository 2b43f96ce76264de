"""Every failure under a view becomes a JSON response in the OpenAI error shape, with the right status."""

from __future__ import annotations

import logging

from flask import Flask, current_app, g, jsonify
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
    message = exc.description or exc.name
    if exc.code == 413:
        message = (f"the request body is over {current_app.config['MAX_CONTENT_LENGTH']} bytes, the box's "
                   "max_request_bytes setting: send less (a long text: split it), or ask the admin to raise it")
    error = APIError(message, code=exc.name.lower().replace(" ", "_"), status=exc.code)
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
