"""One log row per state-changing request (every POST): a LoggedRequest made at its arrival, finished at its end.

The OpenAI endpoints and the admin API share it: generation rows carry prompts and answers, admin rows
carry the request body (what was asked of the box, e.g. a power state), and both join the audit chain
with the key that asked. Reads (listing models, status, logs, metrics) and health probes are not logged.
The request is ``g.logged_request``. A streamed response's body finishes it; every other one is
finished after its response is made (so a log that cannot be written still answers 503), and the
request's teardown is the ``finally`` that finishes whatever an unexpected failure left open.
"""

from __future__ import annotations

import logging

from flask import Blueprint, g, request

from appliance.errors import APIError
from appliance.request import Cancellation, LoggedRequest
from appliance.state import state

log = logging.getLogger(__name__)


def attach(bp: Blueprint, record_body: bool = False) -> None:
    """Log the blueprint's POSTs; ``record_body`` keeps the body as the row's prompt (the admin API's)."""

    @bp.before_request
    def _open():
        if request.method != "POST":
            return
        st, key = state(), g.get("api_key")
        client_gone = request.environ.get("waitress.client_disconnected", lambda: False)
        g.logged_request = LoggedRequest(
            st.db, endpoint=request.path, client=request.remote_addr, key_id=key.id if key else None,
            role=getattr(key, "role", None), observers=tuple(st.request_observers),
            cancel=Cancellation(client_gone=client_gone, shutting_down=st.shutting_down.is_set),
            prompt=request.get_data(as_text=True) if record_body else None,
        )

    @bp.after_request
    def _finish(response):
        logged = g.get("logged_request")
        if logged is not None and not logged.streaming:
            logged.finish()
        return response

    @bp.teardown_request
    def _finish_anyway(exc):
        logged = g.get("logged_request")
        if logged is None or logged.streaming or logged.finished:
            return
        if exc is not None:
            logged.fail(APIError(f"internal error: {exc.__class__.__name__}", code="internal_error", status=500))
        try:
            logged.finish()
        except Exception:  # a teardown must not raise; the row stays open and the next start closes it
            log.exception("could not finish the log row of request %s", logged.id)
