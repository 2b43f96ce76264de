"""The models the box serves: several loaded at once, each in its own runner process with its own queue.

One module owns which models are loaded, as ollama's ``server/sched.go`` does. A request names its
model by name or alias (none: the default model) and the pool loads it on demand. When a load would
pass ``max_loaded`` or ``max_model_memory_mb`` (each model counted as its files plus its KV cache, see
``models.footprint``), the least recently used model with no request in flight is unloaded first;
when none can be, the request gets a 503 that names the setting to raise. Requests for a model that
is loading wait for that one load (its load lock), and loading one model never holds up
another: each has its own runner and its own queue.

A swap points a name or alias at another package: the new model is loaded beside the old one and
must pass a warm-up probe (fixed prompts that generate tokens without error within a deadline)
before the name moves to it, in one assignment; requests already running finish on the old model,
which is unloaded once they have. A model that fails the probe is unloaded and the old one keeps
serving.

Every ``probe_every`` seconds each loaded model with nothing in flight answers a tiny generation
(``appliance.probe``); after 3 failures in a row its runner is restarted, or, when a swap brought it
in within ``rollback_window``, the names go back to the old model.

A model other than the default is unloaded after ``keep_alive`` seconds without requests; the default
one stays until deep idle. The power manager sees the pool as one model: idle frees every loaded
model's KV cache, deep idle unloads them all, and the wake brings back those that were loaded.

Every load, unload, eviction, expiry, swap, failed probe, restart and rollback is a row in
``model_events``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psutil

from appliance import embedding, gpu_memory
from appliance.admission import Admission, ClientBuckets
from appliance.backends.base import BackendError
from appliance.config import ENGINE_SETTINGS, KV_CACHE_BYTES, SAMPLING_DEFAULTS, Settings
from appliance.db import Database
from appliance.errors import APIError, InvalidRequest, LogUnavailable, ModelNotFoundError, ServiceUnavailable
from appliance.probe import LIVE_PROBE, LIVE_PROBE_TOKENS, PROBE_PROMPTS, probe, rewarm
from appliance.runner.supervisor import ModelRunner
from models import ModelEntry, ModelNotFound, bundled_embedding, find_model
from models.footprint import ModelShape, read_shape
from models.kinds import CHAT, EMBEDDING, gguf_dimensions
from models.manifest import SERVING_OPTIONS, ManifestError

log = logging.getLogger(__name__)

SYSTEM = "system"  # who asked, in model_events, when no admin did
EXPIRY_CHECK = 30.0  # most seconds between two looks for models past their keep-alive
MEMORY_SHARE = 0.8  # of the box's memory, the budget when max_model_memory_mb is 0
PROBE_FAILURES = 3  # live probes failed in a row before a model's runner is restarted (or its swap undone)


class PoolFull(ServiceUnavailable):
    """No room for a model: every loaded one is busy, or it alone passes the budget."""

    def __init__(self, message: str):
        super().__init__(message, code="model_pool_full")


class SwapFailed(APIError):
    status = 422

    def __init__(self, message: str):
        super().__init__(message, param="package", code="swap_failed")


class WrongKind(InvalidRequest):
    """A chat request to an embedding model, or the reverse: the message names a model that fits."""

    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_kind_mismatch")


SERVED_AT = {CHAT: "/v1/chat/completions and /v1/completions", EMBEDDING: "/v1/embeddings"}


class ModelBusy(APIError):
    status = 409

    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_busy")


@dataclass(eq=False)
class PooledModel:
    """One model the pool has been asked for: its runner, its queue and how it is used."""

    entry: ModelEntry
    runner: ModelRunner
    admission: Admission
    keep_alive: float | None  # seconds it stays loaded unused; None: until deep idle (the default model)
    options: dict  # its parallel, context_length and threads
    in_use: int = 0  # requests between begin_use and end_use: queued or generating
    last_used: float = 0.0  # monotonic
    loading: bool = False
    asked_keep_alive: float | None = None  # the latest request's shorter keep_alive, if it asked for one
    warming: bool = False  # a swap is loading and probing it: the live probes leave it alone
    resting: bool = False  # unused for idle_after: its KV cache was released (idle, for this model alone)
    probe_failures: int = 0  # consecutive failed live probes
    swapped_from: PooledModel | None = None  # the model a swap replaced with this one, while a rollback may happen
    swapped_at: float = 0.0
    load_lock: threading.Lock = field(default_factory=threading.Lock)  # requests for it wait for one load
    _shape: ModelShape | None = None
    _dimensions: int | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def shape(self) -> ModelShape | None:
        """What its files say (size, KV cache per token, quantization); read once."""
        if self._shape is None and self.entry.path is not None:
            self._shape = read_shape(self.entry.path, self.entry.format)
        return self._shape

    @property
    def dimensions(self) -> int | None:
        """An embedding model's vector length, from its file's header (read once: a GGUF's vocabulary is long)."""
        if self._dimensions is None:
            self._dimensions = _dimensions(self.entry)
        return self._dimensions

    @property
    def memory_mib(self) -> int:
        if self.shape is None:
            return 0
        if self.entry.kind == EMBEDDING:  # no KV cache kept between batches: its file is what it holds
            return -(-self.shape.disk_bytes // 2**20)
        shape = self.shape
        if self.entry.format == "gguf":  # llama.cpp's cache is of kv_cache_type (ONNX Runtime's, of the graph's)
            shape = replace(shape, kv_value_bytes=KV_CACHE_BYTES[self.options["kv_cache_type"]])
        return shape.memory_mib(self.options["context_length"], self.options["parallel"])


class ModelPool:
    """``catalog()`` lists the models this box may serve (the default first is not needed); ``spawn`` starts a
    runner (tests inject an in-thread one, as ollama injects ``newServerFn``)."""

    def __init__(self, settings: Settings, db: Database, default: ModelEntry,
                 catalog: Callable[[], list[ModelEntry]] = list, spawn=None, clock=time.monotonic,
                 total_memory: int | None = None):
        self.settings, self.db, self.catalog, self.spawn, self.clock = settings, db, catalog, spawn, clock
        self.buckets = ClientBuckets(settings.rate_limit_rpm, settings.rate_limit_tpm)
        self.budget_mib = settings.max_model_memory_mb or int(MEMORY_SHARE * (total_memory or _total_memory()) / 2**20)
        # The power manager's hooks: called when any model's request begins and ends using it.
        self.on_begin: list = []
        self.on_end: list = []
        self.on_load: list = []  # hook(model name, seconds) after each load
        self._models: dict[str, PooledModel] = {}
        self._lock = threading.Lock()  # _models
        self._placing = threading.Lock()  # one decision at a time on what is loaded
        self._asleep: list[str] = []  # the models deep idle unloaded: the wake loads them again
        self._routes: dict[str, str] = {}  # a name or alias -> the model a swap pointed it at
        self._cond = threading.Condition()
        self._stopping = False
        self._resting = False  # the power manager idled the box: no live probes until the next request
        self.default = self._add(default)

    # -- finding models -------------------------------------------------------------
    def get(self, name: str | None, kind: str | None = None) -> PooledModel:
        """The model a request names (None: the default, or with ``kind`` the first of that kind), loaded or not;
        404 when the box has no such model, 400 when it is not of ``kind``."""
        model = self._find(name, kind)
        if kind is not None and model.entry.kind != kind:
            raise WrongKind(self._wrong_kind(model, kind))
        return model

    def _wrong_kind(self, model: PooledModel, kind: str) -> str:
        fits = self._first_of(kind)
        instead = f"use {_a(kind)} model such as {fits.name!r}" if fits else f"this box has no {kind} model"
        return (f"model {model.name!r} is {_a(model.entry.kind)} model, served at {SERVED_AT[model.entry.kind]}, "
                f"not {_a(kind)} model: {instead} (GET /v1/models lists each model's kind)")

    def _first_of(self, kind: str) -> PooledModel | None:
        return next((m for m in self.known() if m.entry.kind == kind), None)

    def _find(self, name: str | None, kind: str | None) -> PooledModel:
        if name is None and kind == EMBEDDING and self.settings.embedding_model:
            try:
                return self._find(self.settings.embedding_model, None)
            except ModelNotFoundError:
                raise ModelNotFoundError(f"setting 'embedding_model' names {self.settings.embedding_model!r}, which "
                                         "is not on this box: name a model in the request, or fix the setting "
                                         "(GET /v1/models lists the models)") from None
        if name is None and kind not in (None, self.default.entry.kind):
            model = self._first_of(kind)
            if model is None:
                raise ModelNotFoundError(f"this box has no {kind} model; GET /v1/models lists the models")
            return model
        if name is None:
            return self.default
        with self._lock:
            name = self._routes.get(name, name)
            for model in self._models.values():
                if model.entry.answers_to(name):
                    return model
        for entry in self.catalog():
            if entry.available and entry.answers_to(name):
                with self._lock:
                    return self._models.get(entry.name) or self._add_locked(entry)
        raise ModelNotFoundError(f"model {name!r} is not served here; GET /v1/models lists the models")

    def entry_for(self, package: str) -> ModelEntry:
        """A model to swap in: a known model's name or alias, or the path of a package folder or .gguf file."""
        with self._lock:
            for model in self._models.values():  # by its own names: a swap may have pointed them elsewhere
                if model.entry.answers_to(package):
                    return model.entry
        for entry in self.catalog():
            if entry.available and entry.answers_to(package):
                return entry
        try:
            return find_model(package, home=self.settings.home)
        except ModelNotFound as exc:
            raise ModelNotFoundError(str(exc), param="package") from None
        except ManifestError as exc:
            raise InvalidRequest(f"{package!r} is not a usable package: {exc}", param="package",
                                 code="invalid_value") from None

    def known(self) -> list[PooledModel]:
        """Every model the box may serve, the default first; those never asked for are set up now, unloaded."""
        for entry in self.catalog():
            if entry.available:
                with self._lock:
                    if entry.name not in self._models:
                        self._add_locked(entry)
        with self._lock:
            return sorted(self._models.values(), key=lambda m: (m is not self.default, m.name))

    def loaded(self) -> list[PooledModel]:
        with self._lock:
            return [m for m in self._models.values() if m.runner.is_loaded]

    def _add(self, entry: ModelEntry) -> PooledModel:
        with self._lock:
            return self._add_locked(entry)

    def _add_locked(self, entry: ModelEntry) -> PooledModel:
        options = self.options(entry)
        runner = ModelRunner(entry, threads=options["threads"], context_length=options["context_length"],
                             parallel=options["parallel"], provider=self.settings.provider,
                             stream_interval=self.settings.stream_interval, spawn=self.spawn,
                             engine={k: options[k] for k in ENGINE_SETTINGS}, nice=self.settings.runner_nice)
        admission = Admission(slots=options["parallel"], queue_size=self.settings.queue_size,
                              classes=self.settings.priority_classes, aging=self.settings.queue_aging,
                              buckets=self.buckets)
        model = PooledModel(entry, runner, admission, options["keep_alive"], options, last_used=self.clock())
        if not self._models:  # the first is the default
            model.keep_alive = self._default_keep_alive(model)
        runner.on_begin.append(lambda: self._begin(model))
        runner.on_end.append(lambda: self._end(model))
        runner.on_load.append(lambda seconds: [hook(model.name, seconds) for hook in self.on_load])
        runner.on_crash.append(lambda status: self._record("crash", model, SYSTEM, time.perf_counter(), "failed",
                                                           f"the runner died ({status}); a new one is starting"))
        runner.reload = lambda: self.load(model)  # within max_loaded and the memory budget, as any load
        self._models[entry.name] = model
        return model

    def options(self, entry: ModelEntry) -> dict:
        """Its parallel, context_length, threads and keep_alive: the service's, then what its package suggests,
        then the config's model_settings for it; and its engine settings (the service's, then model_settings)."""
        s = self.settings
        own = s.model_settings.get(entry.name, {})
        chosen = {k: getattr(s, k) for k in SERVING_OPTIONS} | entry.serving | {
            k: own[k] for k in SERVING_OPTIONS if k in own}
        options = {k: int(v) for k, v in chosen.items() if k != "keep_alive"}
        options["keep_alive"] = float(chosen["keep_alive"])
        options |= {k: own.get(k, getattr(s, k)) for k in ENGINE_SETTINGS}
        options["tensor_split"] = tuple(options["tensor_split"])
        return options

    def serving(self, model: PooledModel) -> dict:
        """Each of its SERVING_OPTIONS: the value it got and where from (service, package or model_settings)."""
        own = self.settings.model_settings.get(model.name, {})
        return {k: {"value": model.options[k],
                    "from": "model_settings" if k in own else "package" if k in model.entry.serving else "service"}
                for k in SERVING_OPTIONS}

    def _default_keep_alive(self, model: PooledModel) -> float | None:
        """The default model stays until deep idle, unless its package or model_settings gives it a keep_alive."""
        return model.options["keep_alive"] if self.serving(model)["keep_alive"]["from"] != "service" else None

    def sampling_defaults(self, model: PooledModel) -> dict:
        """The service's defaults, then the model's own (its catalog entry or package), then the config's for it."""
        return SAMPLING_DEFAULTS | model.entry.sampling | self.settings.model_sampling.get(model.name, {})

    # -- activity -------------------------------------------------------------------
    def _begin(self, model: PooledModel) -> None:
        with self._cond:
            model.in_use += 1
            model.last_used = self.clock()
            model.resting = False
            self._resting = False
        for hook in self.on_begin:
            hook()

    def _end(self, model: PooledModel) -> None:
        with self._cond:
            model.in_use -= 1
            model.last_used = self.clock()
            self._cond.notify_all()
        for hook in self.on_end:
            hook()

    # -- loading and unloading ---------------------------------------------------------
    def load(self, model: PooledModel, who: str = SYSTEM, keep: tuple[PooledModel, ...] = ()) -> None:
        """Load the model if it is not, making room first; raises PoolFull or BackendError.

        Always under the model's load lock, which an unload holds too: a request for a model being unloaded
        waits, then loads it again, rather than submitting to a runner that is going away."""
        with model.load_lock:  # a second request for this model waits here for the same load
            if model.runner.is_loaded:
                return
            self._materialize(model, who)
            with self._placing:
                self._make_room(model, who, keep)
                model.loading = True
            start = time.perf_counter()
            try:
                model.runner.ensure_loaded()
            except BackendError as exc:
                self._record("load_failed", model, who, start, "failed", str(exc))
                raise
            finally:
                model.loading = False
            model.last_used = self.clock()  # its keep-alive counts from now, not from its last request
            self._record("load", model, who, start, "ok", f"about {model.memory_mib} MiB")

    def _materialize(self, model: PooledModel, who: str) -> None:
        """Make the file a model is converted into, if it is not there yet (the bundled embedding model's GGUF)."""
        if model.entry.convert_from is None:
            return
        start = time.perf_counter()
        try:
            entry = bundled_embedding.materialize(model.entry)
        except ManifestError as exc:
            self._record("load_failed", model, who, start, "failed", str(exc))
            raise BackendError(str(exc)) from None
        if entry is not model.entry:
            model.entry = model.runner.entry = entry
            model._shape = model._dimensions = None  # its file exists now
            self._record("convert", model, who, start, "ok", f"{entry.convert_from.name} -> {entry.path.name}")

    def _make_room(self, model: PooledModel, who: str, keep: tuple[PooledModel, ...] = ()) -> None:
        """Unload least recently used idle models until ``model`` fits; never one of ``keep``."""
        need, explicit = model.memory_mib, bool(self.settings.max_model_memory_mb)
        if explicit and need > self.budget_mib:
            raise PoolFull(f"model {model.name!r} needs about {need} MiB (its file and its KV cache for "
                           f"{model.options['parallel']} slots of {model.options['context_length']} tokens), more "
                           f"than max_model_memory_mb ({self.budget_mib}): raise max_model_memory_mb, or lower its "
                           "parallel or context_length in model_settings")
        tried: set[str] = set()
        while True:
            with self._lock:
                others = [m for m in self._models.values() if m is not model and (m.runner.is_loaded or m.loading)]
            used = sum(m.memory_mib for m in others)
            counted = [m for m in others if m not in keep]  # a swap loads its new model beside the old one
            # Without a budget set, a model alone always loads: 80% of memory is a guide for sharing, not a cap.
            fits = used + need <= self.budget_mib or (not explicit and not others)
            # Models on a GPU also need its memory: NVML's reading, where there is one (appliance/gpu_memory.py).
            fits = fits and gpu_memory.room_for(need, [m.runner.facts.info for m in others
                                                       if getattr(m.runner, "facts", None) is not None])
            if len(counted) < self.settings.max_loaded and fits:
                return
            idle = sorted((m for m in counted if m.in_use == 0 and not m.loading and m.name not in tried),
                          key=lambda m: m.last_used)
            if not idle:
                raise PoolFull(f"no room to load model {model.name!r}: the {len(others)} loaded model(s) "
                               f"({', '.join(m.name for m in others)}) are serving requests or being swapped "
                               f"(max_loaded {self.settings.max_loaded}, {used} of max_model_memory_mb "
                               f"{self.budget_mib} MiB in use); retry when they finish, or raise max_loaded or "
                               "max_model_memory_mb")
            tried.add(idle[0].name)
            self._unload(idle[0], who, "evict", f"to make room for {model.name}")

    def unload(self, model: PooledModel, who: str = SYSTEM, force: bool = False) -> None:
        """Unload at an admin's request: refused while requests use the model, unless ``force`` (they fail)."""
        with self._placing:
            if model.in_use and not force:
                raise ModelBusy(f"model {model.name!r} has {model.in_use} request(s) in flight; unload it when "
                                "they finish, or add force=true to fail them")
            if model.runner.is_loaded and not self._unload(model, who, "unload", "admin request", force=force):
                raise ModelBusy(f"model {model.name!r} is loading or just got a request; try again")

    def _unload(self, model: PooledModel, who: str, event: str, why: str, force: bool = False) -> bool:
        """Unload under the model's load lock, and unless ``force`` only while nothing uses it; False when it was
        left (loading, in use, or not loaded). Never waits for the lock: the caller may hold ``_placing``,
        which a loader holding its own load lock waits for."""
        if not model.load_lock.acquire(blocking=False):
            return False
        try:
            return self._unload_held(model, who, event, why, force)
        finally:
            model.load_lock.release()

    def _unload_held(self, model: PooledModel, who: str, event: str, why: str, force: bool) -> bool:
        """``_unload`` with the model's load lock already held."""
        with self._cond:
            if not model.runner.is_loaded or (model.in_use and not force):
                return False
        start = time.perf_counter()
        model.runner.unload()
        self._record(event, model, who, start, "ok", why)
        return True

    def _record(self, event: str, model: PooledModel, who: str, start: float, outcome: str, detail: str) -> None:
        ms = (time.perf_counter() - start) * 1000
        log.info("model %s: %s (%s, %.0f ms): %s", model.name, event, outcome, ms, detail)
        try:
            self.db.record_model_event(event=event, model=model.name, who=who, duration_ms=round(ms, 1),
                                       outcome=outcome, detail=detail)
        except LogUnavailable as exc:  # the change happened; a full disk must not undo it
            log.warning("model event %s of %s not recorded: %s", event, model.name, exc.message)

    # -- swap ----------------------------------------------------------------------------
    def swap(self, name: str, entry: ModelEntry, who: str = SYSTEM) -> tuple[PooledModel, dict]:
        """Point ``name`` (a model's name or alias) at ``entry`` once it has loaded and passed the warm-up probe;
        returns the new model and the milliseconds its load, warm-up and switch took. Raises SwapFailed (the old
        model keeps serving), PoolFull or ModelNotFoundError."""
        old = self.get(name)
        if entry.name == old.name:
            raise InvalidRequest(f"{name!r} already serves {entry.name!r}", param="package", code="invalid_value")
        if entry.kind != old.entry.kind:  # its clients would get 400s for every request
            raise InvalidRequest(f"{name!r} serves {_a(old.entry.kind)} model and {entry.name!r} is {_a(entry.kind)} "
                                 "model: swap a name only to a model of the same kind", param="package",
                                 code="model_kind_mismatch")
        start = time.perf_counter()
        with self._lock:
            new = self._models.get(entry.name) or self._add_locked(entry)
        was_loaded, new.warming = new.runner.is_loaded, True
        carried = 0
        try:
            self.load(new, who, keep=(old,))
            loaded = time.perf_counter()
            problem = self._probe(new, self.settings.swap_probe_tokens, self.settings.swap_probe_timeout)
            carried = 0 if problem else self._carry_over(old, new)
        except BackendError as exc:
            problem = f"it did not load: {exc}"
        finally:
            new.warming = False
        if problem:
            if not was_loaded:
                self._unload(new, who, "unload", "failed its swap probe", force=True)
            self._record("swap", new, who, start, "failed", f"{name} stays on {old.name}: {problem}")
            raise SwapFailed(f"swap of {name!r} to {entry.name!r} refused, {old.name!r} keeps serving: {problem}")
        warm = time.perf_counter()
        self._point(old, new, {name, old.name, *old.entry.aliases})  # the switch
        switched = time.perf_counter()
        new.swapped_from, new.swapped_at, new.probe_failures = old, self.clock(), 0
        timings = {"load_ms": round((loaded - start) * 1000, 1), "warm_up_ms": round((warm - loaded) * 1000, 1),
                   "switch_ms": round((switched - warm) * 1000, 3), "chats_carried": carried}
        self._record("swap", new, who, start, "ok", f"{name}: {old.name} -> {new.name}; load {timings['load_ms']:.0f} "
                     f"ms, warm-up {timings['warm_up_ms']:.0f} ms ({carried} recent chats carried over), switch "
                     f"{timings['switch_ms']:.3f} ms")
        self._retire_later(old, who)
        return new, timings

    def _carry_over(self, old: PooledModel, new: PooledModel) -> int:
        """The chats the old model served last, prefilled into the new one's slots before the switch: the first
        requests after it (a client's next question, a chat's next turn) find their prefix as they would have."""
        chats = old.runner.recent_chats() if new.entry.kind != EMBEDDING else []
        return rewarm(new.runner, chats, self.settings.swap_probe_timeout) if chats else 0

    def _retire_later(self, model: PooledModel, who: str) -> None:
        threading.Thread(target=self._retire, args=(model, who), name="model-retire", daemon=True).start()

    def _point(self, old: PooledModel, new: PooledModel, names: set[str]) -> None:
        """Requests that look up ``names``, or any name that led to ``old``, get ``new`` from here on; the default
        and its keep-alive move with it. ``new``'s own names lead to itself again."""
        with self._lock:
            for alias, target in list(self._routes.items()):
                if target == old.name:
                    self._routes[alias] = new.name
            for alias in names:
                self._routes[alias] = new.name
            for alias in (new.name, *new.entry.aliases):
                self._routes.pop(alias, None)
            if self.default is old:
                self.default = new
                new.keep_alive, old.keep_alive = self._default_keep_alive(new), old.options["keep_alive"]

    def _retire(self, old: PooledModel, who: str) -> None:
        """Unload a swapped-out model once the requests it was serving have finished (one that comes back for a
        request that looked it up just before the switch then expires by its keep_alive)."""
        while not self._stopping:
            with self._cond:
                while old.in_use and not self._stopping:
                    self._cond.wait(1.0)
            with self._placing:
                if not old.runner.is_loaded or self._unload(old, who, "unload", "swapped out"):
                    return
            time.sleep(0.05)  # a request took it, or it is loading: look again

    # -- live health probes ----------------------------------------------------------------
    def check_health(self) -> None:
        """Each loaded model with nothing in flight answers a tiny generation; after PROBE_FAILURES failures in a
        row its runner is restarted, or, when a swap brought it in within rollback_window, the swap is undone.
        Not while the box or the model is idle: a probe would fill the caches idle freed."""
        if self._resting:
            return
        for model in self.loaded():
            if model.in_use or model.loading or model.warming or model.resting:
                continue
            start = time.perf_counter()
            problem = self._probe(model, LIVE_PROBE_TOKENS, self.settings.probe_timeout, LIVE_PROBE)
            if problem is None:
                model.probe_failures = 0
                continue
            model.probe_failures += 1
            self._record("probe_failed", model, SYSTEM, start, "failed",
                         f"{problem} ({model.probe_failures} of {PROBE_FAILURES} in a row)")
            if model.probe_failures >= PROBE_FAILURES:
                model.probe_failures = 0
                self._recover(model)

    @staticmethod
    def _probe(model: PooledModel, tokens: int, timeout: float, prompts: tuple[str, ...] = PROBE_PROMPTS) -> str | None:
        """A tiny generation of a chat model; the vectors of a tiny input of an embedding model."""
        if model.entry.kind == EMBEDDING:
            return embedding.probe(model.runner, timeout)
        return probe(model.runner, tokens, timeout, prompts)

    def _recover(self, model: PooledModel) -> None:
        old = model.swapped_from
        if old is not None and self.clock() - model.swapped_at <= self.settings.rollback_window:
            try:
                self._roll_back(model, old)
                return
            except (BackendError, APIError) as exc:  # the old one cannot come back: restart this one instead
                log.error("rolling %s back to %s failed: %s", model.name, old.name, exc)
        start = time.perf_counter()
        with self._placing:  # not if a request started using it meanwhile, or it went away
            if not self._unload(model, SYSTEM, "unload", f"{PROBE_FAILURES} failed probes in a row: restarting"):
                return
        try:
            self.load(model)
            self._record("restart", model, SYSTEM, start, "ok", f"{PROBE_FAILURES} failed probes in a row")
        except (BackendError, APIError) as exc:
            self._record("restart", model, SYSTEM, start, "failed", str(exc))

    def _roll_back(self, model: PooledModel, old: PooledModel) -> None:
        """Point every name the swap moved back at the old model, and retire the one that failed."""
        start = time.perf_counter()
        self.load(old, keep=(model,))
        problem = self._probe(old, self.settings.swap_probe_tokens, self.settings.swap_probe_timeout)
        if problem:
            self._unload(old, SYSTEM, "unload", "failed its probe on the way back")
            raise BackendError(f"{old.name} fails its probe too: {problem}")
        self._point(model, old, set())
        model.swapped_from = None
        self._record("rollback", model, SYSTEM, start, "ok", f"{model.name} -> {old.name}: {PROBE_FAILURES} failed "
                     f"probes within rollback_window ({self.settings.rollback_window:.0f} s) of its swap")
        self._retire_later(model, SYSTEM)

    # -- keep-alive --------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._watch, name="model-watch", daemon=True).start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _watch(self) -> None:
        """Sleep until the next expiry or health probe, do what is due, repeat; nothing ends the thread but stop()."""
        every = self.settings.probe_every
        next_probe = self.clock() + every
        while True:
            with self._cond:
                if self._stopping:
                    return
                wait = self._seconds_to_next_expiry()
                self._cond.wait(min(wait, max(0.0, next_probe - self.clock())) if every else wait)
                if self._stopping:
                    return
            try:
                self.expire()
                if every and self.clock() >= next_probe:
                    self.check_health()
                    next_probe = self.clock() + every
            except Exception:  # without this thread no model would expire or be checked again: log and go on
                log.exception("model pool: a keep-alive or health check failed")
                next_probe = self.clock() + (every or EXPIRY_CHECK)

    def ask_keep_alive(self, model: PooledModel, seconds: float | None) -> None:
        """A request's keep_alive for the model after it (None: the box's); it may shorten the box's, never extend it.
        Not the default model's: one client must not unload what the whole site uses."""
        if model is self.default:
            return
        with self._cond:
            model.asked_keep_alive = seconds
            self._cond.notify_all()

    @staticmethod
    def _keep_alive(model: PooledModel) -> float | None:
        if model.asked_keep_alive is None:
            return model.keep_alive
        return model.asked_keep_alive if model.keep_alive is None else min(model.asked_keep_alive, model.keep_alive)

    def _seconds_to_next_expiry(self) -> float:
        now, soonest = self.clock(), EXPIRY_CHECK
        for model in self.loaded():
            keep_alive = self._keep_alive(model)
            if model.in_use:
                continue
            if keep_alive is not None:
                soonest = min(soonest, max(0.05, model.last_used + keep_alive - now))
            if not model.resting:
                soonest = min(soonest, max(0.05, model.last_used + self.settings.idle_after - now))
        return soonest

    def expire(self) -> None:
        """Unload every model past its keep-alive with nothing in flight; release the KV cache of one unused for
        idle_after, though others keep the box busy (idle, per model)."""
        now = self.clock()
        with self._placing:
            for model in self.loaded():
                keep_alive = self._keep_alive(model)
                if model.warming or model.in_use:
                    continue
                if keep_alive is not None and now - model.last_used >= keep_alive:
                    self._unload(model, SYSTEM, "expire", f"unused for {now - model.last_used:.0f} s "
                                                          f"(keep_alive {keep_alive:.0f} s)")
                elif not model.resting and now - model.last_used >= self.settings.idle_after:
                    model.runner.release_cache()
                    model.resting = True

    # -- the power manager's view: the pool as one model -------------------------------------
    @property
    def name(self) -> str:
        return self.default.name

    @property
    def is_loaded(self) -> bool:
        return bool(self.loaded())

    @property
    def load_count(self) -> int:
        with self._lock:
            return sum(m.runner.load_count for m in self._models.values())

    def ensure_loaded(self) -> None:
        """Wake: the default model comes back now (the request waits for it), the others deep idle unloaded in the
        background; one that no longer loads is logged, and does not stop the wake."""
        others, self._asleep = [n for n in self._asleep if n != self.default.name], []
        self.load(self.default)
        if others:
            threading.Thread(target=self._reload, args=(others,), name="model-wake", daemon=True).start()

    def _reload(self, names: list[str]) -> None:
        for name in names:
            try:
                self.load(self.get(name))
            except (BackendError, APIError) as exc:  # the load_failed event has the detail
                log.error("model %s did not come back after deep idle: %s", name, exc)

    def unload_all(self, why: str = "deep idle") -> None:
        """Deep idle: every model unloaded, one that is loading as soon as its load ends (its load lock, taken
        before _placing as a load takes them, so the two cannot wait on each other)."""
        with self._lock:
            going = [m for m in self._models.values() if m.runner.is_loaded or m.loading]
        self._asleep = [m.name for m in going] or self._asleep
        for model in going:
            with model.load_lock, self._placing:
                self._unload_held(model, SYSTEM, "unload", why, force=True)

    def release_cache(self) -> None:
        self._resting = True
        for model in self.loaded():
            model.runner.release_cache()
            model.resting = True

    # -- what callers see ----------------------------------------------------------------
    def describe(self, model: PooledModel, internals: bool = False) -> dict:
        """A model for /v1/models; ``internals`` (paths, pids, memory estimate, use) for admins only."""
        info = model.runner.info(internals) | {
            "kind": model.entry.kind, "default": model is self.default, "aliases": list(model.entry.aliases),
            "size_bytes": model.shape.disk_bytes if model.shape else None,
            "sampling_defaults": self.sampling_defaults(model),
            "target": model.entry.target or None, "metrics": model.entry.metrics or None,
        }
        info.setdefault("quantization", model.shape.quantization if model.shape else None)
        if info["context_length"] is None:  # not loaded: what it is set to get (the model's own may be less)
            info["context_length"] = model.options["context_length"]
        if model.entry.kind == EMBEDDING:  # the vector length: the engine's once loaded, else its file's
            info["dimensions"] = info.get("dimensions") or model.dimensions
            info.pop("sampling_defaults")
        if internals:
            info.update(estimated_memory_mib=model.memory_mib, in_use=model.in_use, keep_alive=model.keep_alive,
                        seconds_since_use=round(self.clock() - model.last_used, 1), serving=self.serving(model),
                        queue=model.admission.stats() | {"batch_size": model.runner.last_batch_size})
        return info

    def status(self) -> dict:
        """For /api/status: the pool's limits, each loaded model and the latest model events."""
        loaded = self.loaded()
        return {"max_loaded": self.settings.max_loaded, "max_model_memory_mb": self.budget_mib,
                "loaded": [m.name for m in loaded], "estimated_memory_mib": sum(m.memory_mib for m in loaded),
                "events": self.db.model_events(10)}

    def close(self) -> None:
        """At shutdown: every runner ends."""
        self.stop()
        with self._lock:
            models = list(self._models.values())
        for model in models:
            model.runner.unload()


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _dimensions(entry: ModelEntry) -> int | None:
    if entry.convert_from is not None and not entry.path.is_file():  # the bundled one, not converted yet
        return bundled_embedding.DIMENSIONS
    return gguf_dimensions(entry.path) if entry.format == "gguf" else None


def _total_memory() -> int:
    return psutil.virtual_memory().total
