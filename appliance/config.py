"""All settings of the appliance, in one place.

Precedence, lowest to highest: the defaults below < the TOML config file <
environment variables (``APPLIANCE_<NAME>``) < command-line flags.

The config file is ``$APPLIANCE_HOME/config.toml`` unless ``--config`` or
``APPLIANCE_CONFIG`` names another one. Every key in it is a field name below.

The modules that read the settings import this one, never the other way round: the kinds of
value some settings hold (priority classes, retention, auth modes) are defined here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar, Mapping

from models.manifest import SERVING_OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson ships Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names it."""


AUTH_MODES = ("auto", "required", "off")  # appliance.auth says what each one means
PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")


@dataclass(frozen=True)
class PriorityClass:
    """One entry of ``priority_classes``; appliance.admission queues requests by them."""

    name: str
    priority: int  # higher runs first
    max_concurrency: int = 0  # requests of this class queued or running at once; 0 = no limit
    timeout: float = 0.0  # seconds a request may wait in the queue; 0 = no limit


DEFAULT_CLASSES = (
    {"name": "interactive", "priority": 2, "timeout": 120},
    {"name": "default", "priority": 1, "timeout": 300},
    {"name": "batch", "priority": 0, "timeout": 3600},
)
DEFAULT_CLASS = "default"


@dataclass(frozen=True)
class Retention:
    """How much of the log to keep (the ``log_keep_*`` settings); 0 means no limit of that kind."""

    days: float = 0
    rows: int = 0
    megabytes: float = 0

    @property
    def active(self) -> bool:
        return bool(self.days or self.rows or self.megabytes)

    def cutoff(self, now: datetime | None = None) -> str | None:
        """Rows finished before this time are due for pruning."""
        if not self.days:
            return None
        now = now or datetime.now(timezone.utc)
        return (now - timedelta(days=self.days)).isoformat(timespec="milliseconds")


def default_home() -> Path:
    return Path(os.environ.get("APPLIANCE_HOME") or Path.home() / ".appliance")


def default_threads() -> int:
    # llama.cpp decodes fastest with one thread per physical core.
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


# HTTP threads beyond the slots and queue places (each holds one): at 500 users a burst of new requests waiting
# for their 429 left health probes hundreds of ms behind with 4 spare (bench/results/locust); the front door runs
# its requests on the threads idle last, so spare threads cost memory only when a burst uses them.
SPARE_HTTP_THREADS = 32


@dataclass
class Settings:
    home: Path = field(default_factory=default_home, metadata={"help": "data folder: database, config, model packages"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (loopback only by default)"})
    port: int = field(default=8080, metadata={"help": "TCP port to listen on"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "catalog name or path of the model to serve"})
    threads: int = field(default_factory=default_threads, metadata={"help": "CPU threads for inference"})
    context_length: int = field(default=4096, metadata={"help": "context window of each slot in tokens: what one request may hold (capped at the model's own)"})
    parallel: int = field(default=4, metadata={"help": "slots: requests generated together in one batch (each has its own KV cache of context_length tokens)"})
    runner_nice: int = field(default=5, metadata={"help": "niceness added to each model's runner process (0-19): on a box with few cores the HTTP front door, health checks and streams then come before generation; 0 keeps them equal"})
    stream_interval: float = field(default=0.025, metadata={"help": "seconds a stream's text may be held to send several tokens at once (a request's first text and its end go at once; 0: every token)"})
    queue_size: int = field(default=256, metadata={"help": "most requests that may wait for a slot (each holds an HTTP thread); a request joins only when it is expected to start within its class's timeout, else 429 with the estimate as Retry-After"})
    queue_aging: float = field(default=30.0, metadata={"help": "seconds of waiting that raise a request's priority by one class"})
    priority_classes: list = field(default_factory=lambda: [dict(c) for c in DEFAULT_CLASSES], metadata={"help": "priority classes: name, priority (higher first), max_concurrency (0: no limit), timeout (seconds in the queue, 0: no limit)"})
    model_sampling: dict = field(default_factory=dict, metadata={"help": "per model name, sampling defaults that replace the model's own: temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty"})
    embedding_model: str = field(default="", metadata={"help": "model an embeddings request without a model gets (empty: the first embedding model known, the bundled all-MiniLM-L6-v2 where installed)"})
    max_loaded: int = field(default=3, metadata={"help": "models loaded at once, each in its own runner process; loading one more unloads the least recently used idle one"})
    max_model_memory_mb: int = field(default=0, metadata={"help": "memory the loaded models may use together, in MiB (each: its file size plus its KV cache for its slots and context); 0: 80% of the box's memory"})
    keep_alive: float = field(default=300.0, metadata={"help": "seconds a model other than the default stays loaded after its last request; the default model stays until deep idle (a request may ask for less with keep_alive)"})
    swap_probe_tokens: int = field(default=8, metadata={"help": "tokens each warm-up prompt must generate (greedy, without error) before a swap moves a name to the new model"})
    swap_probe_timeout: float = field(default=60.0, metadata={"help": "seconds the swap's warm-up probe may take before the swap is refused"})
    probe_every: float = field(default=15.0, metadata={"help": "seconds between live health probes: each loaded model with no request in flight answers a tiny generation; after 3 failures in a row its runner is restarted (0: no probes)"})
    probe_timeout: float = field(default=10.0, metadata={"help": "seconds a live health probe may take before it counts as failed"})
    rollback_window: float = field(default=600.0, metadata={"help": "seconds after a swap during which 3 failed probes in a row swap the old model back instead of restarting the new one"})
    model_settings: dict = field(default_factory=dict, metadata={"help": "per model name, settings that replace the service's for it: parallel, context_length, threads, keep_alive, gpu_layers, flash_attn, main_gpu, tensor_split, kv_cache_type"})
    rate_limit_rpm: int = field(default=0, metadata={"help": "requests per minute per client (0: no limit)"})
    rate_limit_tpm: int = field(default=0, metadata={"help": "generated tokens per minute per client (0: no limit)"})
    max_prompt_chars: int = field(default=0, metadata={"help": "longest prompt in characters, checked before tokenizing (0: 16 per token of context)"})
    log_text: bool = field(default=True, metadata={"help": "store prompt and response text in the log; false stores only their sha256"})
    log_redact: list[str] = field(default_factory=list, metadata={"help": "regular expressions (Python syntax) whose matches are stored as [REDACTED] in the log's texts"})
    log_text_max_chars: int = field(default=100_000, metadata={"help": "most characters of each prompt and response stored in the log (0: no cap); the sha256 is always of the whole text"})
    log_keep_days: float = field(default=0.0, metadata={"help": "prune log rows older than this many days (0: keep them)"})
    log_keep_rows: int = field(default=0, metadata={"help": "keep at most this many log rows, pruning the oldest (0: no limit)"})
    log_keep_mb: float = field(default=0.0, metadata={"help": "keep the log's rows within this many MiB, pruning the oldest (0: no limit)"})
    audit_checkpoint_rows: int = field(default=100, metadata={"help": "sign a checkpoint of the log's hash chain every this many rows (0: only at shutdown and pruning)"})
    max_request_bytes: int = field(default=4_000_000, metadata={"help": "largest request body accepted, in bytes"})
    max_connections: int = field(default=1000, metadata={"help": "open client connections the box holds; past that, the one idle longest (silent, or still sending its request) is closed to make room, and a running request never is"})
    http_threads: int = field(default=0, metadata={"help": "HTTP worker threads (0: parallel + queue_size + 32, so health probes find one free while a burst of new requests waits to be told 429)"})
    provider: str = field(default="auto", metadata={"help": "ONNX Runtime execution provider: auto, cuda, tensorrt or cpu (auto: best available, else CPU)"})
    gpu_layers: str | int = field(default="auto", metadata={"help": "llama.cpp: layers offloaded to the GPU (auto: every layer where the build can offload, else 0; or a number)"})
    flash_attn: str = field(default="auto", metadata={"help": "llama.cpp: flash attention auto, on or off (a quantized V cache needs it on)"})
    main_gpu: int = field(default=0, metadata={"help": "llama.cpp: the GPU that holds the model (with tensor_split, the one for small tensors)"})
    tensor_split: list[float] = field(default_factory=list, metadata={"help": "llama.cpp: share of the model on each GPU, e.g. [3, 1]; empty: llama.cpp decides"})
    kv_cache_type: str = field(default="f16", metadata={"help": "llama.cpp: the KV cache's type, f16, q8_0 or q4_0 (quantized: less memory per slot)"})
    idle_after: float = field(default=300.0, metadata={"help": "seconds without requests before going idle (KV cache freed, power profile lowered)"})
    deep_idle_after: float = field(default=1800.0, metadata={"help": "seconds without requests before unloading the model"})
    memory_low_mb: int = field(default=256, metadata={"help": "go to deep idle early when the box has less available memory than this"})
    sample_every: float = field(default=30.0, metadata={"help": "seconds between psutil samples of CPU, memory and temperature"})
    power_profile: str = field(default="auto", metadata={"help": "power profile: auto, jetson, linux-cpufreq or none"})
    power_dry_run: bool = field(default=False, metadata={"help": "record what the power profile would run instead of running it"})
    auth: str = field(default="auto", metadata={"help": "API keys: auto (required beyond loopback, or once any key exists), required, or off"})
    allowed_hosts: list[str] = field(default_factory=list, metadata={"help": "names clients may reach the box by (Host header), besides loopback names and IP addresses; '.example.lan' allows its subdomains, '*' any"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate file that turns on HTTPS, with tls_key (both or neither; 'appliance tls self-signed' makes a pair)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key file of tls_cert, which turns on HTTPS (both or neither)"})

    @property
    def worker_threads(self) -> int:
        """HTTP threads: every slot and queue place may hold one, and a few stay free for probes and the UI."""
        return self.http_threads or self.parallel + self.queue_size + SPARE_HTTP_THREADS

    @property
    def prompt_chars_limit(self) -> int:
        return self.max_prompt_chars or 16 * self.context_length

    @property
    def retention(self) -> Retention:
        return Retention(days=self.log_keep_days, rows=self.log_keep_rows, megabytes=self.log_keep_mb)

    @property
    def db_path(self) -> Path:
        return self.home / "logs.db"

    @property
    def config_path(self) -> Path:
        return self.home / "config.toml"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # Where each setting's value came from: "default", "file", "environment" or "flag" (load_settings fills it;
    # a class attribute, not a field, so it is no setting itself).
    sources: ClassVar[Mapping[str, str]] = {}
    config_file: ClassVar[str] = ""  # the config file read, if there was one

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Turn a value from TOML, the environment or a flag into the field's type."""
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "list":
            return _list_of_tables(value)
        if kind == "list[str]":
            return _list_of_strings(value)
        if kind == "list[float]":
            return _list_of_numbers(value)
        if kind == "str | int":  # a word such as "auto", or a number
            return value if isinstance(value, int) and not isinstance(value, bool) else (
                int(value) if str(value).strip().isdigit() else str(value))
        if kind == "dict":
            return _table_of_tables(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r} must be a {kind}, got {value!r}") from None


def _list_of_tables(value: Any) -> list[dict]:
    """A list of TOML tables, or the same as JSON text (from the environment)."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(value)
    return value


def _table_of_tables(value: Any) -> dict[str, dict]:
    """A TOML table of tables (a name -> its table), or the same as JSON text (from the environment)."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(value)
    return value


def _list_of_numbers(value: Any) -> list[float]:
    """A TOML list of numbers, or from the environment a JSON list or comma-separated text."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [float(v) for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError(value)
    return [float(v) for v in value]


def _list_of_strings(value: Any) -> list[str]:
    """A TOML list of strings, or from the environment a JSON list or comma-separated text."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(value)
    return [v.strip() for v in value if v.strip()]


def load_settings(
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, the config file, the environment and flags.

    ``overrides`` holds command-line values; ``None`` values mean "not given".
    """
    environ = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    types = {f.name: f.type for f in fields(Settings)}

    def layer(source: Mapping[str, Any], origin: str) -> dict[str, Any]:
        unknown = set(source) - set(types)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {origin}: {', '.join(sorted(unknown))}")
        return {k: _coerce(k, types[k], v) for k, v in source.items()}

    env_values = {
        name: environ[f"APPLIANCE_{name.upper()}"]
        for name in types
        if f"APPLIANCE_{name.upper()}" in environ
    }
    # The home folder decides where the config file lives, so settle it first.
    home = overrides.get("home") or env_values.get("home") or default_home()
    path = config_file or environ.get("APPLIANCE_CONFIG") or Path(home).expanduser() / "config.toml"
    file_values: dict[str, Any] = {}
    if Path(path).exists():
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    elif config_file:
        raise ConfigError(f"config file not found: {config_file}")

    merged = layer(file_values, str(path)) | layer(env_values, "environment") | layer(overrides, "flags")
    settings = Settings(**merged)
    settings.config_file = str(path) if file_values else ""
    settings.sources = {name: "flag" if name in overrides else "environment" if name in env_values else "file"
                        for name in merged}
    settings.home = Path(settings.home).expanduser()
    settings.tls_cert, settings.tls_key = (os.path.expanduser(p) for p in (settings.tls_cert, settings.tls_key))
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if settings.provider not in PROVIDERS:
        raise ConfigError(f"setting 'provider' must be one of {', '.join(PROVIDERS)}, got {settings.provider!r}")
    for name in ("port", "threads", "context_length", "parallel", "max_request_bytes", "idle_after", "deep_idle_after",
                 "sample_every", "queue_aging", "max_connections", "max_loaded", "swap_probe_tokens",
                 "swap_probe_timeout", "probe_timeout"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"setting {name!r} must be positive, got {getattr(settings, name)}")
    for name in ("http_threads", "queue_size", "stream_interval", "rate_limit_rpm", "rate_limit_tpm", "max_prompt_chars",
                 "log_text_max_chars", "log_keep_days", "log_keep_rows", "log_keep_mb", "audit_checkpoint_rows",
                 "max_model_memory_mb", "keep_alive", "probe_every", "rollback_window"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"setting {name!r} must not be negative, got {getattr(settings, name)}")
    if not 0 <= settings.runner_nice <= 19:
        raise ConfigError(f"setting 'runner_nice' must be between 0 and 19, got {settings.runner_nice}")
    if settings.auth not in AUTH_MODES:
        raise ConfigError(f"setting 'auth' must be one of {', '.join(AUTH_MODES)}, got {settings.auth!r}")
    _validate_classes(settings.priority_classes)
    _validate_per_model("model_sampling", settings.model_sampling, SAMPLING_OPTIONS, least=None)
    _validate_per_model("model_settings", {m: {k: v for k, v in o.items() if k not in ENGINE_SETTINGS}
                                           for m, o in settings.model_settings.items()},
                        MODEL_SETTINGS + ENGINE_SETTINGS, least=0)  # keep_alive may be 0
    _validate_engine("", vars(settings))
    for model, options in settings.model_settings.items():
        _validate_engine(f"model_settings for {model!r}: ", options)
    _validate_patterns(settings.log_redact)
    _validate_power(settings)
    _validate_tls(settings)


def _validate_classes(classes: list[dict]) -> None:
    try:
        names = [PriorityClass(**c).name for c in classes]
    except TypeError as exc:
        raise ConfigError(f"setting 'priority_classes': {exc} (keys: name, priority, max_concurrency, timeout)") from None
    if DEFAULT_CLASS not in names:
        raise ConfigError(f"setting 'priority_classes' needs a class named {DEFAULT_CLASS!r}: requests without one use it")


# What a request that leaves a sampling option out gets, unless its model or model_sampling says otherwise.
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0,
                     "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0}
SAMPLING_OPTIONS = tuple(SAMPLING_DEFAULTS)


# What model_settings may set for one model: the service's own settings of these names are the default, then what
# the model's package suggests (its manifest's "serving").
MODEL_SETTINGS = SERVING_OPTIONS
# llama.cpp's engine settings, service-wide and per model (appliance.backends.llama_cpp reads them).
ENGINE_SETTINGS = ("gpu_layers", "flash_attn", "main_gpu", "tensor_split", "kv_cache_type")
FLASH_ATTN_MODES = ("auto", "on", "off")
KV_CACHE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per number: ggml's blocks of 32 with a scale
KV_CACHE_TYPES = tuple(KV_CACHE_BYTES)


def _validate_engine(where: str, options: dict) -> None:
    layers = options.get("gpu_layers", "auto")
    if layers != "auto" and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise ConfigError(f"{where}setting 'gpu_layers' must be auto or a whole number of layers, got {layers!r}")
    if options.get("flash_attn", "auto") not in FLASH_ATTN_MODES:
        raise ConfigError(f"{where}setting 'flash_attn' must be one of {', '.join(FLASH_ATTN_MODES)}, "
                          f"got {options['flash_attn']!r}")
    if options.get("kv_cache_type", "f16") not in KV_CACHE_TYPES:
        raise ConfigError(f"{where}setting 'kv_cache_type' must be one of {', '.join(KV_CACHE_TYPES)}, "
                          f"got {options['kv_cache_type']!r}")
    main_gpu = options.get("main_gpu", 0)
    if isinstance(main_gpu, bool) or not isinstance(main_gpu, int) or main_gpu < 0:
        raise ConfigError(f"{where}setting 'main_gpu' must be a GPU index (0, 1, ...), got {main_gpu!r}")
    split = options.get("tensor_split", [])
    if not isinstance(split, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in split):
        raise ConfigError(f"{where}setting 'tensor_split' must be a list of shares such as [3, 1], got {split!r}")


def _validate_per_model(setting: str, per_model: dict, known: tuple[str, ...], least: float | None) -> None:
    """A table of model name -> options: every option known and a number (above ``least``, where given)."""
    for model, options in per_model.items():
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"setting {setting!r} for {model!r}: unknown option(s) {', '.join(unknown)} "
                              f"(known: {', '.join(known)})")
        for name, value in options.items():
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not number or (least is not None and (value < least or value == least and name != "keep_alive")):
                kind = "a number" if least is None else "a positive number"
                raise ConfigError(f"setting {setting!r} for {model!r}: {name} must be {kind}, got {value!r}")


def _validate_patterns(patterns: list[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"setting 'log_redact': the pattern {pattern!r}: {exc}") from None


def _validate_power(settings: Settings) -> None:
    if settings.deep_idle_after < settings.idle_after:
        raise ConfigError("setting 'deep_idle_after' must not be shorter than 'idle_after'")


def _validate_tls(settings: Settings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        given, missing = ("tls_cert", "tls_key") if settings.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(f"setting {given!r} needs {missing!r} too: HTTPS takes a certificate and its key; "
                          "'appliance tls self-signed' writes both and prints the two lines for config.toml")


def describe() -> list[tuple[str, str, str]]:
    """(name, default, help) of every setting, for --help texts and the README."""
    out = []
    for f in fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f"({f.default_factory.__name__})"
        out.append((f.name, str(default), f.metadata.get("help", "")))
    return out
