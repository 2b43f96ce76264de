"""API errors, all in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Raise an ``APIError`` anywhere below a view; ``init_app`` turns it, and every
other failure, into a JSON response with the right status.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    pass


class ModelNotFoundError(APIError):
    status = 404

    def __init__(self, message: str, param: str | None = "model"):
        super().__init__(message, param=param, code="model_not_found")


class ContextLengthExceeded(APIError):
    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"


class LogUnavailable(ServiceUnavailable):
    """The request log cannot be written (disk full, I/O error): an appliance that must audit does not serve unlogged."""

    def __init__(self, db_path, detail: str):
        folder = Path(db_path).parent
        super().__init__(
            f"the request log {db_path} cannot be written ({detail}): free disk space under the data folder "
            f"{folder}; requests are served again as soon as the log can be written", code="log_unavailable",
        )


def error_response(error: APIError):
    g.log_error = error.message
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
