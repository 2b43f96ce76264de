"""The runner process: one loaded model, its step loop, and the pipe to the service.

Started by ``appliance.runner.supervisor`` as ``python -m appliance.runner.worker``
with one end of a socket pair. It imports the engine; the service never does.
Two threads: the reader takes messages off the pipe and tokenizes new requests
(so a long prompt never holds up the step loop), the main thread runs the
scheduler. The process ends when told to, or when the service's end of the
pipe closes (the service died). An embedding model (spec ``kind``) gets the
embedding engine and loop (``appliance.runner.embedder``) in the same two threads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from multiprocessing.connection import Connection

from appliance.backends import BackendError, create_backend
from appliance.backends.embedding import create_embedder
from appliance.runner import embedder
from appliance.runner import protocol as msg
from appliance.runner.scheduler import Scheduler, prepare as prepare_generation


def serve(conn: Connection, spec: dict) -> None:
    """Load the model named by spec, then run requests from conn until Shutdown or the pipe closes."""
    send_lock = threading.Lock()

    def emit(message) -> None:
        with send_lock:
            conn.send(message)

    embedding = spec.get("kind") == "embedding"
    try:
        backend = _embedder(spec) if embedding else _generator(spec)
        facts = backend.load()
    except (BackendError, OSError, ValueError) as exc:
        emit(msg.LoadFailed(str(exc)))
        return
    if embedding:
        scheduler = embedder.Embedder(backend, facts, emit)

        def prepare(submit):
            return embedder.prepare(backend, facts, submit)
    else:
        scheduler = Scheduler(backend, facts, emit, stream_interval=spec.get("stream_interval", 0.0))
        scheduler.prime()

        def prepare(submit):
            return _prepare(backend, facts, submit, scheduler)
    emit(msg.Ready(facts))
    threading.Thread(target=_read, args=(conn, scheduler, emit, prepare), name="runner-reader", daemon=True).start()
    try:
        scheduler.run()
    finally:
        backend.close()


def _generator(spec: dict):
    return create_backend(spec["format"], spec["path"], threads=spec["threads"], context_length=spec["context_length"],
                          n_slots=spec["parallel"], provider=spec.get("provider", "auto"), engine=spec.get("engine"))


def _embedder(spec: dict):
    return create_embedder(spec["format"], spec["path"], threads=spec["threads"], context_length=spec["context_length"])


def _prepare(backend, facts, submit: msg.Submit, scheduler: Scheduler):
    """A generation's; an embeddings request sent to a chat model is refused, never half-run."""
    if isinstance(submit.params, msg.EmbedParams):
        return msg.Refused(submit.id, "this model is a chat model, which makes no embeddings: send embeddings "
                           "requests to an embedding model (GET /v1/models lists each model's kind)",
                           code="model_kind_mismatch", param="model")
    return prepare_generation(backend, facts, submit, scheduler.grammars)


def _read(conn: Connection, scheduler, emit, prepare) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the service is gone
            scheduler.inbox.put(msg.Shutdown())
            return
        if isinstance(message, msg.Submit):
            request_id = message.id
            try:
                message = prepare(message)
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
    spec = json.loads(args.spec)
    lower_priority(spec.get("nice", 0))
    serve(Connection(args.fd), spec)


def lower_priority(nice: int) -> None:
    """Add `nice` to every thread of this process. Linux keeps a niceness per thread: threads started later
    inherit it, but an import may already have started one, so each one that exists is set too."""
    if not nice:
        return
    value = min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    tasks = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tasks:
        os.setpriority(os.PRIO_PROCESS, tid, value)


if __name__ == "__main__":
    main()
