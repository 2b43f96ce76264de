"""One log row per state-changing request (every POST), written at its arrival and finished at its end.

The OpenAI endpoints and the admin API share it: generation rows carry prompts and answers, admin rows
carry the request body (what was asked of the box, e.g. a power state), and both join the audit chain
with the key that asked. Reads (listing models, status, logs, metrics) and health probes are not logged.
"""

from __future__ import annotations

import time

from flask import Blueprint, g, request

from appliance.state import state


def attach(bp: Blueprint, record_body: bool = False) -> None:
    """Log the blueprint's POSTs; ``record_body`` keeps the body as the row's prompt (the admin API's)."""

    @bp.before_request
    def _open_log_row():
        g.started = time.perf_counter()
        g.log_fields = {}
        g.log_id = None
        if request.method != "POST":
            return
        key = g.get("api_key")
        body = request.get_data(as_text=True) if record_body else None
        g.log_id = state().db.start_request(endpoint=request.path, client=request.remote_addr,
                                            key_id=key.id if key else None, prompt=body)

    @bp.after_request
    def _close_log_row(response):
        generation = g.get("generation")
        # A generation completes its own row (streams when the stream ends).
        if g.get("log_id") is not None and not (generation and (generation.finished or g.get("streaming"))):
            state().db.finish_request(
                g.log_id,
                status=response.status_code,
                error=g.get("log_error"),
                total_ms=(time.perf_counter() - g.started) * 1000,
                **g.log_fields,
            )
        return response
