"""GPTQ: round weights to a low-bit grid so the layer's outputs move least, not each weight.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al.,
2022, arXiv:2210.17323) rounds one input column at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the
inverse Hessian ``H = X^T X`` of the layer's inputs on calibration text. The
layers are processed in order, each fed the outputs of the already-rounded
layers before it.

This module works on the HF model in torch and leaves the weights *on* the grid
(``scale * (code - zero)``, in float). The grid is the one the exporters'
own round-to-nearest derives: ONNX Runtime's symmetric blocks and llama.cpp's
Q4_0 take ``scale = (signed largest weight) / -8`` (Q5_0: / -16), ONNX's
asymmetric blocks ``(max - min) / 15``, and llama.cpp's IQ4_NL ``largest / -127``
over its 16 non-linear values. Each block keeps the weights that set its
scale at the end codes, so the block rounds to itself and the exporter's scale
is GPTQ's. GPTQ therefore needs no packer of its own: ``appliance export
--algorithm gptq`` rounds here, then quantizes as usual, and
tests/test_gptq.py checks that the packages hold exactly the rounded weights.

The calibration text comes from ``distill.calibration``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

DAMPING = 0.01  # of the mean Hessian diagonal, as in the paper: keeps the Cholesky factorisation stable
LAZY_COLUMNS = 128  # columns rounded before the error is pushed to the rest in one matrix product


class BlockGrid(NamedTuple):
    """One block's grid per row, and where its extremes sit (-1: none to keep)."""

    scale: torch.Tensor  # [rows]
    zero: torch.Tensor  # [rows]
    lowest_at: torch.Tensor  # [rows] column in the block that must get code 0
    highest_at: torch.Tensor  # [rows] column in the block that must get the highest code


# llama.cpp's IQ4_NL: a block's weights are scale * one of these 16 values (kvalues_iq4nl), denser near 0.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Grid:
    """A blockwise grid along each weight row's input dimension, by the exporters' own rules.

    A rounded block reproduces under those rules only if its extremes still sit at the end codes
    (the exporters derive the scale from them), so the weights that set the scale are pinned there.
    """

    block_size: int = 32
    symmetric: bool = True  # zero point 8 (ONNX symmetric, GGUF Q4_0), or one per block (ONNX asymmetric)
    bits: int = 4  # 4, or 5 for GGUF Q5_0 (what llama.cpp's Q4_K_M stores rows that are not whole 256-blocks in)
    # The graph is fp16, so ONNX Runtime quantizes fp16 copies of the weights: the scale then keeps 7
    # significant bits, so every scale * (code - zero) is exact in fp16 and the scale comes back unchanged.
    fp16: bool = False
    # A non-linear grid, symmetric blocks only: weight = scale * table[code], scale = largest / table[0]
    # (IQ4_NL_VALUES). None: the evenly spaced codes above.
    table: tuple[int, ...] | None = None

    @property
    def top(self) -> int:
        return 2**self.bits - 1  # the highest code

    def params(self, w: torch.Tensor) -> BlockGrid:
        """The grid of the block w [rows, block]: Q4_0's scale = largest / -8 (Q5_0: / -16), or ONNX's (max - min) / 15."""
        none = torch.full((w.shape[0],), -1, dtype=torch.long, device=w.device)
        if self.symmetric:
            at = w.abs().argmax(1)
            largest = w.gather(1, at[:, None])[:, 0]
            middle = 2 ** (self.bits - 1)
            lowest = self.table[0] if self.table else -middle
            scale = (largest / lowest).half().float()  # fp16-exact: GGUF and fp16 graphs store scales in fp16
            scale = _significant_bits(scale, 7) if self.fp16 else scale
            return BlockGrid(_nonzero(scale), torch.full_like(scale, middle), torch.where(scale != 0, at, none), none)
        low, high = w.min(1), w.max(1)
        low_value, high_value = low.values.clamp(max=0), high.values.clamp(min=0)  # the range always holds 0
        scale = _nonzero(((high_value - low_value) / self.top).half().float())
        scale = _significant_bits(scale, 7) if self.fp16 else scale
        zero = torch.round(-low_value / scale).clamp(0, self.top)
        return BlockGrid(scale, zero, torch.where(low_value < 0, low.indices, none),
                         torch.where(high_value > 0, high.indices, none))

    def round_column(self, column: torch.Tensor, grid: BlockGrid, index: int) -> torch.Tensor:
        """Column index of a block put on its grid, in float, its extremes pinned to the end codes."""
        codes = self._nearest_codes(column / grid.scale, grid.zero)
        codes = self._pinned(codes, grid.lowest_at, grid.highest_at, index)
        return self._values(codes, grid.scale, grid.zero)

    def _pinned(self, codes: torch.Tensor, lowest_at: torch.Tensor, highest_at: torch.Tensor, column) -> torch.Tensor:
        """codes with the weights at column that set a block's scale moved to the end codes."""
        codes = torch.where(lowest_at == column, torch.zeros_like(codes), codes)
        return torch.where(highest_at == column, torch.full_like(codes, self.top), codes)

    def _nearest_codes(self, scaled: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if self.table:
            table = torch.tensor(self.table, dtype=scaled.dtype, device=scaled.device)
            return torch.bucketize(scaled.contiguous(), (table[1:] + table[:-1]) / 2).to(scaled.dtype)
        return torch.round(scaled + zero).clamp(0, self.top)

    def _values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if self.table:
            return scale * torch.tensor(self.table, dtype=scale.dtype, device=scale.device)[codes.long()]
        return scale * (codes - zero)

    def round_to_nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """Plain round-to-nearest on this grid, each weight on its own: the baseline GPTQ is measured against."""
        return self._blockwise(weight, pin=False)

    def snap(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest with each block's extremes pinned to the end codes, as GPTQ leaves them: weights
        that the exporters' own quantizers give back unchanged (what distill.qat trains through)."""
        return self._blockwise(weight, pin=True)

    def _blockwise(self, weight: torch.Tensor, pin: bool) -> torch.Tensor:
        padded = torch.nn.functional.pad(weight, (0, -weight.shape[1] % self.block_size))  # zeros: grid unchanged
        blocks = padded.reshape(-1, self.block_size)
        grid = self.params(blocks)
        codes = self._nearest_codes(blocks / grid.scale[:, None], grid.zero[:, None])
        if pin:
            column = torch.arange(self.block_size, device=weight.device)[None, :]
            codes = self._pinned(codes, grid.lowest_at[:, None], grid.highest_at[:, None], column)
        rounded = self._values(codes, grid.scale[:, None], grid.zero[:, None])
        return rounded.reshape(padded.shape)[:, : weight.shape[1]]


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero block: any scale keeps it zero


def _significant_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The weight [out, in] rounded onto grid, each column's error compensated in the columns after it."""
    w = weight.detach().clone().float()
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: nothing to preserve
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded = torch.zeros_like(w)
    lazy = max(LAZY_COLUMNS // grid.block_size, 1) * grid.block_size  # a block never straddles two batches
    for start in range(0, w.shape[1], lazy):
        end = min(start + lazy, w.shape[1])
        batch, h_inv_batch = w[:, start:end].clone(), h_inv[start:end, start:end]
        errors = torch.zeros_like(batch)
        for i in range(end - start):
            if i % grid.block_size == 0:  # a new block: its grid from the weights as compensated so far
                block = grid.params(batch[:, i:i + grid.block_size])
            column = batch[:, i]
            rounded[:, start + i] = grid.round_column(column, block, i % grid.block_size)
            error = (column - rounded[:, start + i]) / h_inv_batch[i, i]
            batch[:, i:] -= error[:, None] * h_inv_batch[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return rounded.to(weight.dtype)


# -- the model, layer by layer ------------------------------------------------------
def _layer_inputs(model, samples: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first layer's hidden states per batch, and what every layer gets besides (rotary tables, mask).

    The extras are caught per layer, not copied from the first, because models that mix attention kinds
    (Gemma 3's sliding and global layers) give their layers different masks and rotary tables.
    """
    layers = model.model.layers
    hidden, extras = [], [[] for _ in layers]

    def capture(index):
        def hook(module, args, kwargs):
            if index == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            extras[index].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for i in range(0, len(samples), batch):
            model(samples[i:i + batch].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return hidden, extras


GridFor = Callable[[str, int], "Grid | None"]  # (Linear name, input width) -> its grid, or None to leave it


def quantize_model(model, samples: torch.Tensor, grid_for: GridFor, batch: int = 8,
                   progress: Callable[[str], None] | None = None) -> list[str]:
    """Round every decoder-layer Linear that grid_for gives a grid with GPTQ, in place; returns the names rounded."""
    rounded = []
    with torch.no_grad():
        hidden, extras = _layer_inputs(model, samples, batch)
        for index, layer in enumerate(model.model.layers):
            grids = {name: grid_for(name, module.in_features) for name, module in layer_linears(layer, index)}
            chosen = {name: module for name, module in layer_linears(layer, index) if grids[name] is not None}
            hessians = _hessians(layer, chosen, hidden, extras[index])
            for name, module in chosen.items():
                module.weight.data = gptq_weight(module.weight.data, hessians[name], grids[name])
                rounded.append(name)
            hidden = [_hidden(layer(h, **kwargs)) for h, kwargs in zip(hidden, extras[index])]
            if progress:
                progress(f"GPTQ layer {index + 1}/{len(model.model.layers)}: {len(chosen)} weights rounded")
    return rounded


def layer_linears(layer, index: int) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield f"model.layers.{index}.{name}", module


def _hessians(layer, linears: dict, hidden: list, extras: list[dict]) -> dict[str, torch.Tensor]:
    """X^T X / rows of each linear's input, over all calibration batches."""
    sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in linears.items()}
    rows = {name: 0 for name in linears}

    def accumulate(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += x.T @ x
            rows[name] += x.shape[0]
        return hook

    hooks = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
    try:
        for h, kwargs in zip(hidden, extras):
            layer(h, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: 2 * sums[name] / max(rows[name], 1) for name in linears}


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def write_rounded_copy(src: Path, dst: Path, grid_for: GridFor, samples: torch.Tensor,
                       progress: Callable[[str], None] | None = None, method: Callable | None = None) -> list[str]:
    """An HF folder dst like src, its decoder Linears rounded onto grid_for's grids; returns the names rounded.

    method(model, samples, grid_for, progress=...) rounds in place: quantize_model (GPTQ, the default) or
    distill.qat.train_on_grids.
    """
    import shutil

    from transformers import AutoModelForCausalLM

    from distill.calibration import best_device

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval().to(best_device())
    rounded = (method or quantize_model)(model, samples, grid_for, progress=progress)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf"))
    model.cpu().save_pretrained(dst)
    return rounded
