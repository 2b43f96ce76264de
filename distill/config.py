"""Every setting of the distillation pipeline, in one dataclass.

Precedence is fixed: defaults (below) < the TOML file < command-line flags.
The CLI builds one ``--flag`` per field from this table, so the help text of
each field is also its ``--help`` line. The whole config is saved inside every
checkpoint and in report.json.
"""

from __future__ import annotations

import json

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package (setup.cfg installs it there)
    import tomli as tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config file or flag value that cannot work; the message says which and why."""


def opt(default, help: str):
    """A dataclass field with a default and a help line (shown by --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DistillConfig:
    # --- teacher -------------------------------------------------------------
    teacher: str = opt("smollm2", "teacher: an HF folder, a .gguf file, a folder holding one .gguf, or a catalog name")
    # --- student -------------------------------------------------------------
    student: str = opt("depth", "how to build the student: depth | width | config")
    keep_every: int = opt(2, "depth: keep every k-th teacher layer (DistilBERT-style init from the teacher)")
    keep_last: bool = opt(True, "depth: always keep the teacher's last layer (it shapes the logits most)")
    keep_layers: list = opt([], "depth: explicit teacher layer indices to keep, e.g. [0,2,4]; overrides keep_every")
    hidden_size: int = opt(0, "width: student hidden size (0 = teacher's)")
    intermediate_size: int = opt(0, "width: student MLP size (0 = teacher's)")
    width_init: str = opt("prune", "width: 'prune' (keep the teacher's largest channels) or 'fresh' (random init)")
    student_overrides: dict = opt({}, "config: JSON object of HF config fields changed from the teacher's; fresh init")
    # --- data ----------------------------------------------------------------
    data: list = opt([], "text/JSONL files, folders or globs; empty = the texts made by `distill generate`")
    text_field: str = opt("text", "JSONL key that holds the text")
    block_size: int = opt(512, "tokens per packed training block")
    val_fraction: float = opt(0.02, "share of documents held out for evaluation (split by document, never inside one)")
    max_tokens: int = opt(0, "stop reading data after this many tokens (0 = no limit)")
    data_cache: str = opt("", "folder for the tokenized blocks (empty = OUT_DIR/data); runs on the same data can share it")
    # --- teacher-generated data (`distill generate`) --------------------------
    generate_n: int = opt(0, "number of texts to sample from the teacher (0 = none)")
    prompts: str = opt("", "prompt list file, one prompt a line (empty = the built-in list)")
    gen_max_new_tokens: int = opt(256, "tokens sampled per text")
    gen_temperature: float = opt(1.0, "sampling temperature for generated texts")
    gen_top_p: float = opt(0.95, "nucleus sampling threshold for generated texts")
    gen_batch_size: int = opt(64, "prompts sampled at once")
    # --- loss ----------------------------------------------------------------
    alpha: float = opt(0.9, "weight of the KL(teacher||student) term; 1-alpha goes to cross-entropy on the data")
    temperature: float = opt(2.0, "softmax temperature for the KL term (the term is scaled by T^2)")
    hidden_weight: float = opt(0.0, "weight of the hidden-state cosine loss on mapped layers (depth students only)")
    # --- optimisation ----------------------------------------------------------
    max_steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(16, "blocks per micro-batch per device")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak learning rate (AdamW)")
    min_lr: float = opt(5e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "linear warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only, not norms or biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    seed: int = opt(1337, "seed for init, batch order and sampling: same seed, same run")
    # --- bookkeeping ----------------------------------------------------------
    out_dir: str = opt("runs/distill", "output folder: student/, checkpoints, data cache, report")
    log_every: int = opt(10, "record the training loss every N steps")
    eval_every: int = opt(200, "held-out loss every N steps (0 = only at the end)")
    eval_batches: int = opt(8, "micro-batches per periodic evaluation (the final one uses the whole split)")
    checkpoint_every: int = opt(500, "save a resumable checkpoint every N steps (0 = only at the end)")
    baseline: bool = opt(False, "also train a CE-only baseline (same architecture, init and steps) and report it")

    def validate(self) -> "DistillConfig":
        if self.student not in ("depth", "width", "config"):
            raise ConfigError(f"student must be depth, width or config, not {self.student!r}")
        if self.width_init not in ("prune", "fresh"):
            raise ConfigError(f"width_init must be prune or fresh, not {self.width_init!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], not {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, not {self.temperature}")
        if self.keep_every < 1:
            raise ConfigError(f"keep_every must be >= 1, not {self.keep_every}")
        for name in ("max_steps", "batch_size", "grad_accum", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), not {self.val_fraction}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)


FIELDS = {f.name: f for f in fields(DistillConfig)}


def field_help(name: str) -> str:
    return FIELDS[name].metadata["help"]


def field_default(name: str):
    f = FIELDS[name]
    return f.default_factory() if f.default is MISSING else f.default


def coerce(name: str, value):
    """A value from TOML or a flag, checked against the field's type."""
    kind = type(field_default(name))
    if kind in (list, dict) and isinstance(value, str) and (kind is dict or value.lstrip().startswith("[")):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}: expected a JSON {kind.__name__}, got {value!r} ({exc})") from None
    if kind is list and isinstance(value, (str, int)):
        value = [value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> DistillConfig:
    """Defaults < TOML file < overrides (flags); None in overrides means 'not given'."""
    values: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        # Tables are only for grouping in the file; their keys are the field names.
        flat = {}
        for key, value in raw.items():
            if isinstance(value, dict) and key not in FIELDS:
                flat.update(value)
            else:
                flat[key] = value
        unknown = sorted(set(flat) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {unknown}; `python -m distill train --help` lists them")
        values.update(flat)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return DistillConfig(**{k: coerce(k, v) for k, v in values.items()}).validate()
