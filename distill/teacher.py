"""Load a teacher (HF folder or GGUF file) and its tokenizer as a torch causal LM."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import ConfigError


class TeacherNotFound(LookupError):
    """The teacher spec names nothing on this box; the message says what is accepted."""


class UnsupportedTeacher(ConfigError):
    """transformers cannot load this GGUF's architecture; the message lists the ones it can."""


def check_gguf_architecture(path: Path) -> None:
    """Refuse, naming what is supported, a GGUF whose architecture transformers' GGUF loader does not know."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    field = GGUFReader(path).fields.get("general.architecture")
    arch = field.contents() if field else "(none recorded)"
    # llama.cpp writes qwen2moe, gpt-oss where transformers lists qwen2_moe, gpt_oss
    known = {name.replace("_", "") for name in GGUF_SUPPORTED_ARCHITECTURES}
    if arch.replace("-", "").replace("_", "") not in known:
        supported = ", ".join(sorted(n for n in GGUF_SUPPORTED_ARCHITECTURES if n not in ("general", "tokenizer")))
        raise UnsupportedTeacher(f"{path.name}: transformers cannot load a {arch!r} GGUF as a teacher; it loads "
                                 f"{supported} (or give the model's HF folder)")


def resolve_teacher(spec: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for an HF folder, a .gguf path, or a catalog name."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise TeacherNotFound(f"{path} holds no config.json and {len(ggufs)} .gguf files; name the file itself")
    try:
        from models import ModelNotFound, find_model
    except ImportError:  # the catalog is part of the appliance; a bare copy of distill/ has no catalog
        raise TeacherNotFound(f"teacher {spec!r}: no such file or folder") from None
    try:
        entry = find_model(spec, home=_appliance_home())
    except ModelNotFound as exc:
        raise TeacherNotFound(f"teacher {spec!r}: not a file or folder, and {exc}") from None
    return entry.path.parent, entry.path.name


def _appliance_home() -> Path:
    """The appliance's data folder, from its one config, whose registered packages can be teachers too."""
    from appliance.config import ConfigError, load_settings

    try:
        return load_settings().home
    except ConfigError as exc:
        raise TeacherNotFound(f"cannot look up registered model packages: {exc}") from None


def load_tokenizer(spec: str):
    folder, gguf_file = resolve_teacher(spec)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_teacher(spec: str, dtype=torch.float32):
    """The teacher in eval mode with no gradients; GGUF weights come back dequantized."""
    folder, gguf_file = resolve_teacher(spec)
    if gguf_file:
        check_gguf_architecture(folder / gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    # A GGUF load records where it came from; the dequantized torch model is plain weights.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.eval().requires_grad_(False)
    return model
