"""Serving the app with waitress: a production WSGI server that streams, and a clean shutdown.

On SIGTERM or SIGINT the service stops accepting work, running generations
end with finish_reason "cancelled", and every log row is completed before
the process exits.
"""

from __future__ import annotations

import logging
import signal
import threading

import waitress

from appliance.state import AppState

log = logging.getLogger("appliance")

# Seconds running requests get to finish their log rows after a stop signal.
SHUTDOWN_GRACE = 10


def serve(app, host: str, port: int, http_threads: int, on_ready=print) -> None:
    st: AppState = app.extensions["appliance"]
    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=http_threads,
        # Lets waitress notice a client that hangs up while its request runs,
        # so a dropped stream stops generating (environ["waitress.client_disconnected"]).
        channel_request_lookahead=1,
        ident="appliance",
        clear_untrusted_proxy_headers=True,
    )
    threading.Thread(target=_load_model, args=(st,), name="model-loader", daemon=True).start()

    def stop(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        st.shutting_down.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    on_ready(f"appliance: serving {st.runner.name} on http://{host}:{server.effective_port}/v1 (Ctrl-C stops)")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        st.shutting_down.set()
        st.power.stop()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=SHUTDOWN_GRACE)
        server.close()
        st.runner.unload()
        # Whatever the grace period did not let finish still gets a complete row.
        st.db.close_open_rows(status=503, error="service shut down before the request finished")
        st.db.close()
        on_ready("appliance: stopped")


def _load_model(st: AppState) -> None:
    try:
        st.runner.ensure_loaded()
        log.info("model %s loaded in %.2fs", st.runner.name, st.runner.load_seconds)
    except Exception as exc:  # readyz and every request report it
        log.error("model %s failed to load: %s", st.runner.name, exc)
