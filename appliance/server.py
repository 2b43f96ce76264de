"""Serving the app with waitress: a production WSGI server that streams, and a clean shutdown.

On SIGTERM or SIGINT the service stops accepting work, running generations
end with finish_reason "cancelled", and every log row is completed before
the process exits.
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading

from appliance.auth import is_loopback
from appliance.front_door import FrontDoor, allow_open_files, create_front_door
from appliance.state import AppState
from appliance.tls_frontend import TLSFrontend

log = logging.getLogger("appliance")

# Seconds running requests get to finish their log rows after a stop signal.
SHUTDOWN_GRACE = 10
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). In a burst, dozens of
# request threads are runnable at once, and a health probe's thread waited its turn behind each of them.
SWITCH_INTERVAL = 0.001


def serve(app, tls_context: ssl.SSLContext | None = None, on_ready=print) -> None:
    """Serve on the configured host and port: HTTPS through a TLSFrontend when given a TLS context."""
    st: AppState = app.extensions["appliance"]
    sys.setswitchinterval(SWITCH_INTERVAL)
    server, frontend, url = _listen(app, st.settings, tls_context)
    threading.Thread(target=_load_model, args=(st,), name="model-loader", daemon=True).start()

    def stop(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        st.shutting_down.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    on_ready(f"appliance: serving {st.models.default.name} on {url} (Ctrl-C stops)")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        st.shutting_down.set()
        if frontend is not None:
            frontend.close()  # no new connections; the open ones end as waitress ends them
        st.power.stop()
        st.retention.stop()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=SHUTDOWN_GRACE)
        server.close()
        st.models.close()
        # Whatever the grace period did not let finish still gets a complete row.
        st.db.close_open_rows(status=503, error="service shut down before the request finished")
        st.db.close()  # signs a checkpoint of the audit chain's head
        on_ready("appliance: stopped")


def _listen(app, settings, tls_context: ssl.SSLContext | None) -> tuple[FrontDoor, TLSFrontend | None, str]:
    """waitress on the public address; with TLS, on loopback behind a TLSFrontend on the public address.

    Returns the waitress server, the frontend (or None) and the address clients use.
    """
    connections = allow_open_files(settings.max_connections)
    if tls_context is None:
        server = create_front_door(app, settings.host, settings.port, settings.worker_threads, connections,
                                   settings.max_request_bytes)
        _warn_if_clear_text(settings.host)
        return server, None, f"http://{settings.host}:{server.effective_port}/v1"
    frontend = TLSFrontend(tls_context, settings.host, settings.port, max_connections=connections)
    server = create_front_door(frontend.wrap(app), "127.0.0.1", 0, settings.worker_threads, connections,
                               settings.max_request_bytes)
    frontend.start(upstream_port=server.effective_port)
    return server, frontend, f"https://{settings.host}:{frontend.port}/v1"


def _warn_if_clear_text(host: str) -> None:
    if not is_loopback(host):
        log.warning("listening on %s without TLS: API keys and prompts cross the network in clear text. For HTTPS "
                    "run 'appliance tls self-signed --host NAME' and add the tls_cert and tls_key lines it prints "
                    "to config.toml", host)


def _load_model(st: AppState) -> None:
    model = st.models.default
    try:
        st.models.load(model)
        log.info("model %s loaded in %.2fs", model.name, model.runner.load_seconds)
    except Exception as exc:  # readyz and every request report it
        log.error("model %s failed to load: %s", model.name, exc)
