"""Calibration: text to run a model on before rounding it, and what is measured on it.

GPTQ (``distill.gptq``), QAT (``distill.qat``) and llama.cpp's importance matrix
all weigh rounding errors by the activations a model sees. The text is, by
default, the model's own answers to the distillation prompts (data-free, as in
LLM-QAT, arXiv:2305.17888), so an offline machine needs no dataset and the
report's held-out text is never seen; a text file can be given instead.
``Calibration`` makes both, text and importance matrix, once per export source.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distill.export_request import ExportRequest, Progress, step

# Calibration sequences of 256 tokens, by algorithm (64 for the others): QAT trains on them, so it takes as many
# answers as the prompts give.
CALIBRATION_SEQUENCES = {"qat": 256}


def sampled_calibration(model, tokenizer, count: int = 64, length: int = 256, seed: int = 0, batch: int = 16,
                        progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """count x length tokens of the model's own answers to varied instructions (distill.generate's prompts).

    Prompts and answers run together and are cut into sequences, so every token is real text in the
    model's chat format. Sampled at temperature 0.7: text like what the model will be asked to write.
    """
    import random

    from distill.generate import DEFAULT_PROMPTS

    order = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = _stop_ids(model, tokenizer)
    if tokenizer.pad_token is None:  # a tokenizer read from a GGUF may have none, and a batch needs one
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    stream: list[int] = []
    while len(stream) < count * length:  # the prompts run out after a few hundred sequences: sample them again
        prompts = order.sample(DEFAULT_PROMPTS, len(DEFAULT_PROMPTS))
        for start in range(0, len(prompts), batch):
            if len(stream) >= count * length:
                break
            stream += _answers(model, tokenizer, prompts[start:start + batch], length, pad, stops, device)
            if progress:
                progress(f"calibration text: {min(len(stream), count * length)}/{count * length} tokens")
    return _cut(stream, length)[:count]


def _answers(model, tokenizer, prompts: list[str], length: int, pad: int, stops: set[int], device) -> list[int]:
    """Each prompt in the chat format followed by the model's sampled answer, up to its first stop token."""
    from distill.generate import chat_prompt

    texts = [chat_prompt(tokenizer, p) for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    out = model.generate(**encoded.to(device), do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=length,
                         pad_token_id=pad)
    width = encoded["input_ids"].shape[1]
    tokens: list[int] = []
    for row, mask in zip(out.cpu().tolist(), encoded["attention_mask"].cpu().tolist()):
        answer = row[width:]
        # Up to the first stop token (pad can be the end-of-turn token itself: SmolLM2), not every non-pad.
        end = next((i + 1 for i, t in enumerate(answer) if t in stops), len(answer))
        tokens += row[mask.index(1):width] + answer[:end]
    return tokens


def _stop_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


def text_calibration(tokenizer, text: str, count: int = 64, length: int = 256) -> torch.Tensor:
    """A calibration text cut into up to count sequences of length tokens."""
    return _cut(tokenizer(text)["input_ids"], length)[:count]


def _cut(ids: list[int], length: int) -> torch.Tensor:
    count = len(ids) // length
    if count == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens; calibration needs at least {length}")
    return torch.tensor(ids[: count * length]).reshape(count, length)


# -- importance matrix -------------------------------------------------------------
def importance(model, samples: torch.Tensor, batch: int = 8) -> dict[str, np.ndarray]:
    """Linear name -> the mean square of each input column over the samples: llama.cpp's importance matrix.

    llama.cpp's quantizer weighs each weight's rounding error by its column's value, as ``llama-imatrix``
    measures it (the diagonal of GPTQ's Hessian, up to a factor the quantizer does not see).
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def accumulate(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    hooks = [m.register_forward_hook(accumulate(name)) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(samples), batch):
                model(samples[i:i + batch].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / rows[name]).cpu().numpy().astype(np.float32) for name in sums}


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- one export source's calibration ---------------------------------------------------
class Calibration:
    """The calibration text of one source and what is measured on it, each made once, when first needed.

    The request's source, calibration settings and algorithm decide them, never its target, so one
    Calibration serves every target's export."""

    def __init__(self, request: ExportRequest, progress: Progress = print):
        self.request, self.progress, self._samples, self._importance = request, progress, None, None

    def samples(self) -> torch.Tensor:
        if self._samples is None:
            self._samples = calibration_samples(self.request, self.progress)
        return self._samples

    def importance(self, skip=()) -> dict:
        """GGUF tensor name -> importance matrix row, for the decoder Linears not in skip (llama-imatrix collects
        no others)."""
        if self._importance is None:
            self._importance = source_importance(self.request, self.samples(), self.progress)
        return {gguf: row for name, (gguf, row) in self._importance.items() if name not in skip}


def calibration_samples(request: ExportRequest, progress: Progress = print) -> torch.Tensor:
    """The calibration sequences, shared by every format of this export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.src)
    count = request.calibration_sequences or CALIBRATION_SEQUENCES.get(request.algorithm, 64)
    if request.calibration is not None:
        with step(f"read the calibration text {request.calibration}", progress):
            return text_calibration(tokenizer, Path(request.calibration).read_text(encoding="utf-8"), count=count)
    with step("sample calibration text from the source (its answers to the distillation prompts)", progress):
        model = AutoModelForCausalLM.from_pretrained(request.src).eval().to(best_device())
        return sampled_calibration(model, tokenizer, count=count, progress=progress)


def source_importance(request: ExportRequest, samples: torch.Tensor, progress: Progress = print) -> dict:
    """Linear name -> (its GGUF tensor name, its importance matrix row), measured on the float source."""
    from transformers import AutoModelForCausalLM

    from distill.export_gguf import gguf_name

    with step("measure the importance matrix on the calibration text", progress):
        model = AutoModelForCausalLM.from_pretrained(request.src, dtype=torch.float32).eval().to(best_device())
        rows = importance(model, samples)
    return {name: (gguf_name(name + ".weight"), row) for name, row in rows.items() if name.startswith("model.layers.")}
