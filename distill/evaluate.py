"""Held-out metrics: perplexity of each model, and top-1 next-token agreement with the teacher."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(models: dict, val_blocks: np.ndarray, batch_size: int, accelerator, max_batches: int = 0, teacher=None) -> dict:
    """{name: {loss, ppl, tokens, agreement?}} over the held-out blocks, in order.

    Every model sees the same positions; the teacher's forward runs once per batch and
    serves all of them. agreement = share of positions where argmax(model) == argmax(teacher).
    """
    device = accelerator.device
    sums = {name: {"nll": 0.0, "agree": 0, "tokens": 0} for name in models}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    n_batches = math.ceil(len(val_blocks) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        x = torch.from_numpy(val_blocks[b * batch_size : (b + 1) * batch_size].astype(np.int64)).to(device)
        targets = x[:, 1:]
        with accelerator.autocast():
            t_logits = teacher(x).logits[:, :-1].float() if teacher is not None else None
            t_pred = t_logits.argmax(-1) if t_logits is not None else None
            for name, model in models.items():
                logits = t_logits if model is teacher else model(x).logits[:, :-1].float()
                s = sums[name]
                s["nll"] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                s["tokens"] += targets.numel()
                if t_pred is not None:
                    s["agree"] += (logits.argmax(-1) == t_pred).sum().item()
    for name, m in models.items():
        m.train(was_training[name])
    out = {}
    for name, s in sums.items():
        loss = s["nll"] / s["tokens"]
        out[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": s["tokens"]}
        if teacher is not None:
            out[name]["agreement"] = s["agree"] / s["tokens"]
    return out
