"""Quantization-aware fine-tuning: weights learned through the rounding they will get.

GPTQ (``distill.gptq``) rounds one layer at a time. This trains the whole model
through the rounding instead: the forward pass uses each weight as the exporter
will round it (``Grid.snap``), the backward pass treats the
rounding as the identity (the straight-through estimator), and the loss is the
KL divergence from the original float model's next-token distribution on the
calibration text, the model's own answers (LLM-QAT, arXiv:2305.17888: no
dataset needed). Only the rounded Linears' weights move.

The weights are saved rounded, each on its grid, so the exporters'
own round-to-nearest reproduces them exactly, as with GPTQ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from distill.gptq import Grid, GridFor, layer_linears

# Side by side on one student (run 10), 1000 steps beat 300 in the arm GGUF: perplexity ratio 1.013 -> 1.006,
# agreement 90.8% -> 92.2%; the KL was still falling. About three minutes on an H200.
STEPS = 1000
# Peak, decayed to zero by a cosine. On the student, 2e-4 beat 5e-5 in all three packages tried (perplexity
# ratio 1.011 -> 0.992, 1.038 -> 1.011, 1.030 -> 1.004: bench/results/export_student/runs/2026-11-27-run8/notes.md).
LEARNING_RATE = 2e-4
BATCH = 8


class OnGrid(torch.nn.Module):
    """A weight parametrization: rounded on the way forward, untouched on the way back."""

    def __init__(self, grid: Grid):
        super().__init__()
        self.grid = grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.grid.snap(weight) - weight).detach()


def train_on_grids(model, samples: torch.Tensor, grid_for: GridFor, steps: int = STEPS, lr: float = LEARNING_RATE,
                   batch: int = BATCH, progress: Callable[[str], None] | None = None) -> list[str]:
    """Fine-tune model in place so that its decoder Linears, rounded onto grid_for's grids, follow the float
    model; leaves them rounded. Returns the names of the Linears trained."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    linears = [pair for index, layer in enumerate(model.model.layers) for pair in layer_linears(layer, index)]
    chosen = {name: (module, grid_for(name, module.in_features)) for name, module in linears}
    chosen = {name: (module, grid) for name, (module, grid) in chosen.items() if grid is not None}
    model.requires_grad_(False).train()
    for module, grid in chosen.values():
        parametrize.register_parametrization(module, "weight", OnGrid(grid))
    latent = [module.parametrizations.weight.original for module, _ in chosen.values()]
    for weight in latent:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(latent, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            x = samples[torch.randint(len(samples), (batch,), generator=order)].to(device)
            loss = kl_from_float(teacher, model, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if progress and ((step + 1) % 50 == 0 or step + 1 == steps):
                progress(f"QAT step {step + 1}/{steps}: KL from the float model {loss.item():.4f}")
    finally:
        for module, _ in chosen.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)  # keep them rounded
    model.requires_grad_(True).eval()
    return list(chosen)


def kl_from_float(teacher, student, x: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per predicted token."""
    with torch.no_grad():
        target = F.log_softmax(teacher(x, use_cache=False).logits.float(), -1)
    predicted = F.log_softmax(student(x, use_cache=False).logits.float(), -1)
    return F.kl_div(predicted.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")

