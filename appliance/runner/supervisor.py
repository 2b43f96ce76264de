"""The service's side of a runner process: start it, stream its tokens, notice when it dies.

The model lives in a child process (``appliance.runner.worker``) so that a
crash of the engine (segfault, OOM kill, ``kill -9``) fails only its
in-flight requests, and unloading the model (deep idle) hands all of its
memory, a GPU context included, back to the system. The next request starts
a new runner. Files are verified before every start; an unchanged file is
not hashed again.

The power manager works through this class (``ensure_loaded``, ``unload``,
``release_cache`` and the ``on_begin``/``on_end`` hooks), never on a process.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

from appliance.backends.base import BackendError, ModelFacts, SamplingParams
from appliance.runner import protocol as msg
from models import ModelEntry
from models.catalog import VerifiedFiles
from models.manifest import ManifestError

log = logging.getLogger(__name__)

START_TIMEOUT = 300  # seconds a runner may take to load its model
INTERNAL_FACTS = ("file",)  # what an engine reports of itself that only admins see


class RunnerCrashed:
    """Put on a request's stream when its runner died under it."""

    def __init__(self, message: str):
        self.message = message


class RequestStream:
    """The events of one request, in order: Admitted or Refused, then Outputs, ending with a finish, Failed or RunnerCrashed."""

    def __init__(self, request_id: int, choices: int = 1):
        self.id = request_id
        self.events: queue.Queue = queue.Queue()
        self.open_choices = choices  # it ends when each of its choices has finished

    def get(self, timeout: float | None = None):
        return self.events.get(timeout=timeout)


class ModelRunner:
    """``spawn(spec)`` starts a runner and returns (connection, child); the default is a process of its own.

    Tests inject another (ollama injects ``newServerFn`` the same way): the service has no test-only branch.
    """

    def __init__(self, entry: ModelEntry, threads: int, context_length: int, parallel: int = 1,
                 provider: str = "auto", stream_interval: float = 0.0, spawn=None, engine: dict | None = None,
                 nice: int = 0):
        self.entry = entry
        self.spec = {"format": entry.format, "path": str(entry.path), "threads": threads,
                     "context_length": context_length, "parallel": parallel, "provider": provider,
                     "stream_interval": stream_interval, "kind": entry.kind, "engine": engine or {}, "nice": nice}
        self.spawn = spawn or RunnerProcess.start
        self.facts: ModelFacts | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.load_count = 0
        self.crash_count = 0
        self.last_batch_size = 0
        self.prefilled_tokens = 0  # prompt tokens the engine computed, over this runner's life
        # (messages, tools) of its latest chats, about what its slots hold: a swap prefills them into the new
        # model (appliance.probe.rewarm) so that their next turns find their prefix there too. Gone with the cache.
        self._recent_chats: deque[tuple[list[dict], list[dict] | None]] = deque(maxlen=parallel)
        # Called as hook() when a request starts using the model and hook() again when it stops:
        # the power manager counts activity and wakes the box through these.
        self.on_begin: list = []
        self.on_end: list = []
        self.on_load: list = []  # hook(seconds) after each successful load: the metrics' load durations
        self.on_crash: list = []  # hook(exit status) when the runner died unplanned, before it is restarted
        self.reload = self.ensure_loaded  # how a crashed runner comes back (the pool's load makes room first)
        self._verified = VerifiedFiles()
        self._ids = itertools.count(1)
        self._streams: dict[int, RequestStream] = {}
        self._lock = threading.Lock()  # _streams and the pipe's sending end
        self._loading = threading.Lock()  # one start at a time, however many requests wait for it
        self._child = None
        self._conn: Connection | None = None

    # -- identity ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def is_loaded(self) -> bool:
        return self._child is not None and self._child.alive() and self.facts is not None

    @property
    def busy_slots(self) -> int:
        return len(self._streams)

    # -- lifecycle -------------------------------------------------------------
    def ensure_loaded(self) -> ModelFacts:
        with self._loading:
            if not self.is_loaded:
                start = time.perf_counter()
                try:
                    self._verify_files()
                    self._start()
                except BackendError as exc:
                    self.load_error = str(exc)
                    raise
                self.load_error = None
                self.load_seconds = time.perf_counter() - start
                self.load_count += 1
                for hook in self.on_load:
                    hook(self.load_seconds)
            return self.facts

    def _verify_files(self) -> None:
        try:
            self._verified.check(self.entry)
        except (ManifestError, OSError) as exc:
            raise BackendError(f"refusing to load {self.entry.name!r}: {exc}") from exc

    def _start(self) -> None:
        self._stop_child()
        self.facts = None
        self._conn, self._child = self.spawn(self.spec)
        start = _Start()  # this child's own: a late end of the previous child's reader cannot touch it
        threading.Thread(target=self._read, args=(self._conn, self._child, start), name="runner-events",
                         daemon=True).start()
        if not start.done.wait(START_TIMEOUT):
            self._stop_child()
            raise BackendError(f"the runner did not load {self.entry.name!r} in {START_TIMEOUT} s")
        if not isinstance(start.answer, msg.Ready):
            detail = start.answer.message if start.answer else f"the runner process exited ({self._child.exit_status()})"
            self._stop_child()
            raise BackendError(f"could not load {self.entry.name!r}: {detail}")
        self.facts = start.answer.facts

    def unload(self) -> None:
        """End the runner process: all of the model's memory goes back to the system."""
        with self._loading:
            self._stop_child()
            self.facts = None
            self._forget_chats()

    def _stop_child(self) -> None:
        with self._lock:
            child, conn = self._child, self._conn
            self._child = self._conn = None  # from here on its end is planned, not a crash
        if child is None:
            return
        try:
            conn.send(msg.Shutdown())
        except OSError:
            pass
        if not child.wait(10):
            child.kill()
        conn.close()
        self._fail_streams("the model was unloaded while this request ran")

    def release_cache(self) -> None:
        self._forget_chats()
        if self.is_loaded:
            self._send(msg.ReleaseCache())

    # -- requests ------------------------------------------------------------
    def recent_chats(self) -> list[tuple[list[dict], list[dict] | None]]:
        """The (messages, tools) of its latest chats, one per slot at most: about what its slots hold."""
        with self._lock:
            return list(self._recent_chats)

    def _forget_chats(self) -> None:
        with self._lock:
            self._recent_chats.clear()

    def submit(self, messages: list[dict] | None, prompt: str | None, params,
               tools: list[dict] | None = None) -> RequestStream:
        stream = RequestStream(next(self._ids), choices=getattr(params, "n", 1))
        with self._lock:
            self._streams[stream.id] = stream
            if messages is not None and isinstance(params, SamplingParams):
                self._recent_chats.append((messages, tools))
        try:
            self._send(msg.Submit(stream.id, params, messages=messages, prompt=prompt, tools=tools))
        except BackendError:
            self._streams.pop(stream.id, None)
            raise
        return stream

    def cancel(self, stream: RequestStream) -> None:
        if stream.id in self._streams:
            try:
                self._send(msg.Cancel(stream.id))
            except BackendError:
                pass

    def _send(self, message) -> None:
        with self._lock:
            if self._conn is None:
                raise BackendError("the model is not loaded")
            try:
                self._conn.send(message)
            except OSError as exc:
                raise BackendError(f"the runner is gone: {exc}") from exc

    def begin_use(self) -> None:
        """A request starts using the model (the power manager wakes the box). Pair with end_use, even if this raises."""
        for hook in self.on_begin:
            hook()

    def end_use(self) -> None:
        for hook in self.on_end:
            hook()

    # -- events from the runner --------------------------------------------------
    def _read(self, conn: Connection, child, start: _Start) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: _stop_child closed it mid-read (its handle is None)
                break
            if isinstance(message, (msg.Ready, msg.LoadFailed)):
                start.answer = message
                start.done.set()
            else:
                self._dispatch(message)
        if not start.done.is_set():  # died while loading
            start.done.set()
            return
        if self._child is child:  # not a planned stop
            self.crash_count += 1
            status = child.exit_status()
            log.error("runner of %s died (%s); the next request starts a new one", self.entry.name, status)
            self._fail_streams(f"the model's runner process died ({status}); retry the request")
            for hook in self.on_crash:
                hook(status)
            threading.Thread(target=self._restart, name="runner-restart", daemon=True).start()

    def _restart(self) -> None:
        try:
            self.reload()
        except Exception as exc:  # no room, or no load: readyz and the model events say why; the next request tries
            log.error("restarting the runner of %s failed: %s", self.entry.name, exc)

    def _dispatch(self, message) -> None:
        if isinstance(message, msg.Step):
            self.last_batch_size = message.batch_size
            self.prefilled_tokens += message.prefilled
            for output in message.outputs:
                self._deliver(output.id, output, ends=output.finish_reason is not None)
        elif isinstance(message, (msg.Refused, msg.Failed)):
            self._deliver(message.id, message, ends=True, every_choice=True)
        elif isinstance(message, msg.Admitted):
            self._deliver(message.id, message, ends=False)

    def _deliver(self, request_id: int, event, ends: bool, every_choice: bool = False) -> None:
        """Put event on its request's stream; one that ends a choice (or all of them) may end the stream."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None and ends:
                stream.open_choices = 0 if every_choice else stream.open_choices - 1
                if stream.open_choices <= 0:
                    del self._streams[request_id]
        if stream is not None:
            stream.events.put(event)

    def _fail_streams(self, message: str) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.events.put(RunnerCrashed(message))

    # -- facts -------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def info(self, internals: bool = False) -> dict:
        """What clients may know of the model; ``internals`` (its file's path, the runner's pid) for admins only."""
        info = {"id": self.entry.name, "format": self.entry.format, "loaded": self.is_loaded,
                "load_count": self.load_count, "runner_crashes": self.crash_count}
        if internals:
            info.update(path=str(self.entry.path), runner_pid=self.pid if self.is_loaded else None,
                        prefilled_tokens=self.prefilled_tokens)
        if self.facts is not None:
            engine = {k: v for k, v in self.facts.info.items() if internals or k not in INTERNAL_FACTS}
            info.update(engine, context_length=self.facts.context_length, parallel=self.facts.n_slots)
        else:
            info.update(context_length=None, parallel=self.spec["parallel"])
        if self.load_seconds is not None:
            info["load_seconds"] = round(self.load_seconds, 3)
        if self.load_error:  # its text may name files: admins only
            info["load_failed"] = True
            if internals:
                info["load_error"] = self.load_error
        return info


class _Start:
    """How one runner's start went: its Ready or LoadFailed, or nothing if it died first."""

    def __init__(self):
        self.done = threading.Event()
        self.answer: msg.Ready | msg.LoadFailed | None = None


class RunnerProcess:
    """A runner in its own process, talking over a socket pair."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    def start(cls, spec: dict):
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "appliance.runner.worker", "--fd", str(theirs.fileno()), "--spec", json.dumps(spec)]
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_child_env())
        theirs.close()
        return Connection(ours.detach()), cls(proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def exit_status(self) -> str:
        code = self.proc.wait()
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env
