"""All settings of the appliance, in one place.

Precedence, lowest to highest: the defaults below < the TOML config file <
environment variables (``APPLIANCE_<NAME>``) < command-line flags.

The config file is ``$APPLIANCE_HOME/config.toml`` unless ``--config`` or
``APPLIANCE_CONFIG`` names another one. Every key in it is a field name below.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson ships Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names it."""


def default_home() -> Path:
    return Path(os.environ.get("APPLIANCE_HOME") or Path.home() / ".appliance")


def default_threads() -> int:
    # llama.cpp decodes fastest with one thread per physical core.
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass
class Settings:
    home: Path = field(default_factory=default_home, metadata={"help": "data folder: database, config, model packages"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (loopback only by default)"})
    port: int = field(default=8080, metadata={"help": "TCP port to listen on"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "catalog name or path of the model to serve"})
    threads: int = field(default_factory=default_threads, metadata={"help": "CPU threads for inference"})
    context_length: int = field(default=4096, metadata={"help": "context window in tokens (capped at the model's own)"})
    log_text: bool = field(default=True, metadata={"help": "store prompt and response text in the log; false stores only their sha256"})
    max_request_bytes: int = field(default=4_000_000, metadata={"help": "largest request body accepted, in bytes"})
    http_threads: int = field(default=8, metadata={"help": "HTTP worker threads (requests beyond one wait for the model)"})
    provider: str = field(default="auto", metadata={"help": "ONNX Runtime execution provider: auto, cuda, tensorrt or cpu (auto: best available, else CPU)"})
    idle_after: float = field(default=300.0, metadata={"help": "seconds without requests before going idle (KV cache freed, power profile lowered)"})
    deep_idle_after: float = field(default=1800.0, metadata={"help": "seconds without requests before unloading the model"})
    memory_low_mb: int = field(default=256, metadata={"help": "go to deep idle early when the box has less available memory than this"})
    sample_every: float = field(default=30.0, metadata={"help": "seconds between psutil samples of CPU, memory and temperature"})
    power_profile: str = field(default="auto", metadata={"help": "power profile: auto, jetson, linux-cpufreq or none"})
    power_dry_run: bool = field(default=False, metadata={"help": "record what the power profile would run instead of running it"})

    @property
    def db_path(self) -> Path:
        return self.home / "logs.db"

    @property
    def config_path(self) -> Path:
        return self.home / "config.toml"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r} must be a {kind}, got {value!r}") from None


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
    settings.home = Path(settings.home).expanduser()
    _validate(settings)
    return settings


PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")


def _validate(settings: Settings) -> None:
    if settings.provider not in PROVIDERS:
        raise ConfigError(f"setting 'provider' must be one of {', '.join(PROVIDERS)}, got {settings.provider!r}")
    for name in ("port", "threads", "context_length", "max_request_bytes", "http_threads", "idle_after", "deep_idle_after", "sample_every"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"setting {name!r} must be positive, got {getattr(settings, name)}")
    _validate_power(settings)


def _validate_power(settings: Settings) -> None:
    if settings.deep_idle_after < settings.idle_after:
        raise ConfigError("setting 'deep_idle_after' must not be shorter than 'idle_after'")


def describe() -> list[tuple[str, str, str]]:
    """(name, default, help) of every setting, for --help texts and the README."""
    out = []
    for f in fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f"({f.default_factory.__name__})"
        out.append((f.name, str(default), f.metadata.get("help", "")))
    return out
