"""API errors, all in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Raise an ``APIError`` anywhere below a view; ``appliance.api.error_handlers``
turns it, and every other failure, into a JSON response with the right status.
This module imports no Flask: the database and the CLI raise these too.
"""

from __future__ import annotations

import re
from pathlib import Path


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


class GenerationFailed(APIError):
    """The engine failed or its runner died mid-request (our fault, so a 5xx)."""

    type = "server_error"


class LogUnavailable(ServiceUnavailable):
    """The request log cannot be written (disk full, I/O error): an appliance that must audit does not serve unlogged."""

    def __init__(self, db_path, detail: str):
        folder = Path(db_path).parent
        super().__init__(
            f"the request log {db_path} cannot be written ({detail}): free disk space under the data folder "
            f"{folder}; requests are served again as soon as the log can be written", code="log_unavailable",
        )


_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\":]+/)*[^\s'\":]*")


def hide_paths(text: str) -> str:
    """A message for callers who are not admins: absolute file paths become their file's name."""
    return _PATH.sub(lambda m: "<...>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
