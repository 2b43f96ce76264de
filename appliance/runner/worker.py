"""The runner process: one loaded model, its step loop, and the pipe to the service.

Started by ``appliance.runner.supervisor`` as ``python -m appliance.runner.worker``
with one end of a socket pair. It imports the engine; the service never does.
Two threads: the reader takes messages off the pipe and tokenizes new requests
(so a long prompt never holds up the step loop), the main thread runs the
scheduler. The process ends when told to, or when the service's end of the
pipe closes (the service died).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from multiprocessing.connection import Connection

from appliance.backends import BackendError, create_backend
from appliance.runner import protocol as msg
from appliance.runner.scheduler import Scheduler, prepare


def serve(conn: Connection, spec: dict) -> None:
    """Load the model named by spec, then run requests from conn until Shutdown or the pipe closes."""
    send_lock = threading.Lock()

    def emit(message) -> None:
        with send_lock:
            conn.send(message)

    try:
        backend = create_backend(spec["format"], spec["path"], threads=spec["threads"],
                                 context_length=spec["context_length"], n_slots=spec["parallel"],
                                 provider=spec.get("provider", "auto"))
        facts = backend.load()
    except (BackendError, OSError, ValueError) as exc:
        emit(msg.LoadFailed(str(exc)))
        return
    emit(msg.Ready(facts))
    scheduler = Scheduler(backend, facts, emit, stream_interval=spec.get("stream_interval", 0.0))
    threading.Thread(target=_read, args=(conn, backend, facts, scheduler, emit), name="runner-reader",
                     daemon=True).start()
    try:
        scheduler.run()
    finally:
        backend.close()


def _read(conn: Connection, backend, facts, scheduler: Scheduler, emit) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the service is gone
            scheduler.inbox.put(msg.Shutdown())
            return
        if isinstance(message, msg.Submit):
            request_id = message.id
            try:
                message = prepare(backend, facts, message, scheduler.grammars)
            except Exception as exc:  # a bug must fail this request, never the reader (which would hang them all)
                emit(msg.Failed(request_id, f"could not prepare the request: {exc.__class__.__name__}: {exc}"))
                continue
            if isinstance(message, msg.Refused):
                emit(message)
                continue
        scheduler.inbox.put(message)
        if isinstance(message, msg.Shutdown):
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An appliance runner process (started by the service).")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the pipe to the service")
    parser.add_argument("--spec", required=True, help="JSON: format, path, threads, context_length, parallel, provider")
    args = parser.parse_args(argv)
    # A terminal's Ctrl-C or a stop signal to the group is the service's to handle: it finishes its
    # requests' rows and then tells this process to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(args.fd), json.loads(args.spec))


if __name__ == "__main__":
    main()
