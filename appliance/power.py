"""Low-power idle: an unused box steps down, and the next request wakes it.

    active --idle_after--> idle --deep_idle_after--> deep_idle
       ^                    |                           |
       +---- next request --+---------------------------+

Idle drops the KV caches, lowers the process priority where it can be raised
again, and applies the box's power profile. Deep idle unloads every model. A
request wakes the box, which loads again the models that were loaded;
concurrent requests wait for one reload (the pool's per-model load lock). The
manager sees the model pool as one model. One background thread sleeps until the next deadline or the next
psutil sample: no busy polling.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import resource
import threading
import time

import psutil

from appliance import power_profiles
from appliance.db import Database
from appliance.errors import LogUnavailable
from appliance.pool import ModelPool

log = logging.getLogger(__name__)

ACTIVE, IDLE, DEEP_IDLE = "active", "idle", "deep_idle"
STATES = (ACTIVE, IDLE, DEEP_IDLE)
IDLE_NICE = 10


class PowerManager:
    def __init__(
        self,
        models: ModelPool,
        db: Database,
        idle_after: float,
        deep_idle_after: float,
        memory_low_mb: int = 256,
        sample_every: float = 30.0,
        profile: str = "auto",
        dry_run: bool = False,
    ):
        self.models, self.db = models, db
        self.idle_after, self.deep_idle_after = idle_after, deep_idle_after
        self.memory_low = memory_low_mb * 1024 * 1024
        self.sample_every = sample_every
        self.profile = power_profiles.get_profile(profile)
        self.dry_run = dry_run
        self.state = ACTIVE
        self.since = time.time()
        self.last_activity = time.monotonic()
        self.last_wake_ms: float | None = None
        self.last_actions: list[dict] = []
        self.last_sample: dict = {}
        self.in_flight = 0
        self._process = psutil.Process()
        self._cond = threading.Condition()
        self._transition = threading.Lock()  # one state change at a time
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="power-manager", daemon=True)
        models.on_begin.append(self.request_started)
        models.on_end.append(self.request_finished)

    def start(self) -> None:
        self._process.cpu_percent()  # primes the counter so the first sample means something
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # -- activity ------------------------------------------------------------
    def request_started(self) -> None:
        with self._cond:
            self.in_flight += 1
            self.last_activity = time.monotonic()
            asleep = self.state != ACTIVE
            self._cond.notify_all()
        if asleep:
            self.set_state(ACTIVE, "request")

    def request_finished(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self.last_activity = time.monotonic()
            self._cond.notify_all()

    # -- transitions -----------------------------------------------------------
    def set_state(self, target: str, reason: str) -> None:
        """Move to a state now (a request, the timer, low memory or an admin asked)."""
        if target not in STATES:
            raise ValueError(f"unknown power state {target!r}: use one of {', '.join(STATES)}")
        with self._transition:
            source = self.state
            if source == target:
                return
            rss_before = tree_rss(self._process)
            wake_ms = None
            if target == ACTIVE:
                wake_ms = self._wake(source)
            elif target == IDLE:
                self._idle(source)
            else:
                self._deep_idle(source)
            with self._cond:
                self.state, self.since = target, time.time()
                self._cond.notify_all()
            self._record(from_state=source, to_state=target, reason=reason, rss_before=rss_before,
                         rss_after=tree_rss(self._process), wake_ms=wake_ms,
                         actions=json.dumps(self.last_actions))
            log.info("power: %s -> %s (%s)", source, target, reason)

    def _record(self, **event) -> None:
        # The change has happened; a log that cannot take its row (disk full) must not undo or fail it.
        # The database keeps the reason in log_error, which /readyz reports.
        try:
            self.db.record_power_event(**event)
        except LogUnavailable as exc:
            log.warning("power: %s -> %s not recorded: %s", event["from_state"], event["to_state"], exc.message)

    def _wake(self, source: str) -> float:
        start = time.perf_counter()
        self._set_nice(0)
        self.last_actions = power_profiles.apply(self.profile.on_active, self.dry_run)
        if source == DEEP_IDLE:
            self.models.ensure_loaded()
        self.last_wake_ms = (time.perf_counter() - start) * 1000
        return self.last_wake_ms

    def _idle(self, source: str) -> None:
        if source == DEEP_IDLE:  # an admin asked for idle from deep idle: the model comes back
            self.models.ensure_loaded()
        self.models.release_cache()
        self.last_actions = power_profiles.apply(self.profile.on_idle, self.dry_run)
        self._set_nice(IDLE_NICE)

    def _deep_idle(self, source: str) -> None:
        if source == ACTIVE:
            self.last_actions = power_profiles.apply(self.profile.on_idle, self.dry_run)
            self._set_nice(IDLE_NICE)
        self.models.unload_all()
        _return_freed_memory()

    def _set_nice(self, value: int) -> None:
        """Lower priority when idle, but only if we can raise it again (root, or RLIMIT_NICE allows)."""
        if value > 0 and not _can_restore_priority():
            self.last_actions.append({"step": f"nice {value}", "ok": False,
                                      "detail": "skipped: restoring priority would need root or RLIMIT_NICE"})
            return
        try:
            self._process.nice(value)
        except psutil.AccessDenied as exc:
            self.last_actions.append({"step": f"nice {value}", "ok": False, "detail": str(exc)})

    # -- the watcher thread ----------------------------------------------------
    def _watch(self) -> None:
        """Sleep until the next deadline or sample, act, repeat; nothing that goes wrong ends the thread."""
        next_sample = time.monotonic()
        retry_at = 0.0  # after a failed step, nothing is tried again before this
        while True:
            target = None
            with self._cond:
                if self._stopping:
                    return
                due, candidate = self._next_transition()
                due = None if due is None else max(due, retry_at)
                now = time.monotonic()
                if due is not None and due <= now:
                    target = candidate
                else:
                    self._cond.wait(max(0.0, min(next_sample, due or next_sample) - now))
            try:
                next_sample = self._step(target, next_sample)
            except Exception:
                # Without this thread the box never idles again: log, and try again at the next sample.
                log.exception("power manager: a step failed; trying again in %.0f s", self.sample_every)
                retry_at = next_sample = time.monotonic() + self.sample_every

    def _step(self, target: str | None, next_sample: float) -> float:
        """Take the sample and the transition that are due; returns when the next sample is."""
        if time.monotonic() >= next_sample:
            next_sample = time.monotonic() + self.sample_every
            self._sample_and_check_memory()
        if target is not None:
            self.set_state(target, "no requests for %.0f s" % (time.monotonic() - self.last_activity))
        return next_sample

    def _next_transition(self) -> tuple[float | None, str | None]:
        if self.in_flight:
            return None, None
        if self.state == ACTIVE:
            return self.last_activity + self.idle_after, IDLE
        if self.state == IDLE:
            return self.last_activity + self.deep_idle_after, DEEP_IDLE
        return None, None

    def _sample_and_check_memory(self) -> None:
        self.last_sample = sample(self._process)
        low = self.last_sample["available_memory"] < self.memory_low
        if low and self.state != DEEP_IDLE and self.in_flight == 0:
            mb = self.last_sample["available_memory"] // 2**20
            self.set_state(DEEP_IDLE, f"low memory: {mb} MiB available")

    def status(self) -> dict:
        due, target = self._next_transition()
        return {
            "state": self.state,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "seconds_in_state": round(time.time() - self.since, 1),
            "next_state": target,
            "seconds_to_next_state": None if due is None else round(max(0.0, due - time.monotonic()), 1),
            "last_wake_ms": None if self.last_wake_ms is None else round(self.last_wake_ms, 1),
            "requests_in_flight": self.in_flight,
            "profile": self.profile.name,
            "dry_run": self.dry_run,
            "last_actions": self.last_actions,
            "model": {"id": self.models.name, "loaded": self.models.is_loaded, "load_count": self.models.load_count},
            "system": sample(self._process),
        }


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of the service and its runner processes, in bytes."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # it ended meanwhile
            pass
    return total


def sample(process: psutil.Process) -> dict:
    """A cheap look at the process and the box (a few /proc reads)."""
    memory = psutil.virtual_memory()
    out = {
        "rss": tree_rss(process),  # the runner's model and KV cache included
        "rss_service": process.memory_info().rss,
        "cpu_percent": process.cpu_percent(),
        "system_cpu_percent": psutil.cpu_percent(),
        "available_memory": memory.available,
        "total_memory": memory.total,
    }
    temps = getattr(psutil, "sensors_temperatures", lambda: {})()
    if temps:
        out["temperatures_c"] = {name: max(t.current for t in entries) for name, entries in temps.items() if entries}
    gpu_load = "/sys/devices/gpu.0/load"  # Jetson's integrated GPU, in tenths of a percent
    if os.path.exists(gpu_load):
        with open(gpu_load) as f:
            out["gpu_percent"] = int(f.read().strip() or 0) / 10
    return out


def _can_restore_priority() -> bool:
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - soft <= 0


M_ARENA_MAX = -8  # mallopt() parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread heaps before the server starts its threads.

    Each thread that allocates gets its own arena by default, and a model
    loaded and unloaded from different threads leaves pages behind in each:
    deep-idle RSS grew ~2 MiB per wake/sleep cycle in a hand test, and about
    0.3 MiB with two arenas (bench/results/power/summary.md shows each cycle). Like
    MALLOC_ARENA_MAX=2, but set after start-up, for the threads made later.
    """
    _glibc("mallopt", M_ARENA_MAX, arenas)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS so RSS really drops (glibc keeps them otherwise)."""
    gc.collect()
    _glibc("malloc_trim", 0)


def _glibc(function: str, *args) -> None:
    """Call a glibc allocator function; other C libraries (musl, macOS) have none, and nothing is done."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass
