"""Build a smaller student from a teacher: by depth, by width, or from an explicit config."""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM

from distill.config import ConfigError, DistillConfig

LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def count_params(model) -> dict:
    """Parameter counts (tied weights once): total, in the transformer layers, in embeddings/head."""
    seen, total, layers = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if LAYER_KEY.match(name):
            layers += p.numel()
    return {"total": total, "layers": layers, "other": total - layers}


def depth_layers(cfg: DistillConfig, n_teacher: int) -> list[int]:
    """Teacher layer indices the student keeps, in order."""
    if cfg.keep_layers:
        keep = [int(i) for i in cfg.keep_layers]
        if sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n_teacher:
            raise ConfigError(f"keep_layers must be increasing indices in [0, {n_teacher - 1}], got {keep}")
        return keep
    keep = list(range(0, n_teacher, cfg.keep_every))
    if cfg.keep_last and keep[-1] != n_teacher - 1:
        keep[-1] = n_teacher - 1  # swap the last kept layer for the final one: same count, keeps the output layer
    return keep


def _fresh(config, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_by_depth(teacher, keep: list[int], seed: int):
    """DistilBERT-style: a shallower copy whose layer i starts as the teacher's layer keep[i]."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # Gemma-3, Qwen-3: per-layer attention kind
        config.layer_types = [config.layer_types[i] for i in keep]
    student = _fresh(config, seed)
    source = teacher.state_dict()
    new_index = {old: new for new, old in enumerate(keep)}
    mapped = {}
    for name, tensor in source.items():
        m = LAYER_KEY.match(name)
        if m is None:
            mapped[name] = tensor
        elif int(m.group(2)) in new_index:
            mapped[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    student.load_state_dict(mapped, strict=True)
    return student


# Which dimensions of each weight are the hidden size (H) or the MLP size (I), by name suffix.
WIDTH_DIMS = {
    "embed_tokens.weight": "-H",
    "lm_head.weight": "-H",
    "q_proj.weight": "-H",
    "k_proj.weight": "-H",
    "v_proj.weight": "-H",
    "o_proj.weight": "H-",
    "gate_proj.weight": "IH",
    "up_proj.weight": "IH",
    "down_proj.weight": "HI",
}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def build_by_width(teacher, hidden: int, inter: int, init: str, seed: int):
    """Narrower hidden and/or MLP; 'prune' keeps the teacher's highest-magnitude channels."""
    config = copy.deepcopy(teacher.config)
    if not getattr(config, "head_dim", None):  # Qwen2Config has no head_dim: derived from the hidden size
        config.head_dim = config.hidden_size // config.num_attention_heads
    # Attention keeps its heads and head_dim: only the projections' hidden side shrinks.
    config.hidden_size, config.intermediate_size = hidden, inter
    student = _fresh(config, seed)
    if init == "fresh":
        return student
    source = teacher.state_dict()
    # Hidden channels ranked by their weight in the embedding, one choice for every layer (the residual stream).
    h_keep = _top(source["model.embed_tokens.weight"].abs().sum(0), hidden)
    target = {}
    for name, tensor in student.state_dict().items():
        w = source[name]
        suffix = next((s for s in WIDTH_DIMS if name.endswith(s)), None)
        if suffix is None:  # norms over the hidden size; anything else keeps its shape (Qwen2's q/k/v biases and
            # Gemma 3's q/k norms are per head, and may be as long as the hidden size)
            over_hidden = name.endswith("layernorm.weight") or name == "model.norm.weight"
            target[name] = w[h_keep] if over_hidden else w
            continue
        prefix = name[: -len(suffix)]
        up = source.get(prefix + "up_proj.weight")  # MLP units are ranked by their input weights
        for dim, role in enumerate(WIDTH_DIMS[suffix]):
            if role == "H":
                w = w.index_select(dim, h_keep)
            elif role == "I":
                w = w.index_select(dim, _top(up.abs().sum(1), inter))
        target[name] = w
    student.load_state_dict(target, strict=True)
    return student


def build_from_config(teacher, overrides: dict, seed: int):
    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"student_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return _fresh(config, seed)


def build_student(teacher, cfg: DistillConfig):
    """The student and, for depth students, the teacher layer each student layer came from."""
    n = teacher.config.num_hidden_layers
    if cfg.student == "depth":
        keep = depth_layers(cfg, n)
        return build_by_depth(teacher, keep, cfg.seed), keep
    if cfg.student == "width":
        hidden = cfg.hidden_size or teacher.config.hidden_size
        inter = cfg.intermediate_size or teacher.config.intermediate_size
        if hidden > teacher.config.hidden_size or inter > teacher.config.intermediate_size:
            raise ConfigError("width: hidden_size and intermediate_size must not exceed the teacher's")
        return build_by_width(teacher, hidden, inter, cfg.width_init, cfg.seed), None
    return build_from_config(teacher, cfg.student_overrides, cfg.seed), None
