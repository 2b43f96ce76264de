"""The distillation objective: soft-target KL + hard-target CE (+ optional hidden-state cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token on T-softened distributions, times T^2 (Hinton et al., 2015).

    The T^2 keeps the gradient scale of the soft term comparable to CE as T changes.
    Computed in float32: bf16 log-softmax over a 49k vocabulary loses the small probabilities.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token i+1 from position i."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


def hidden_cosine(student_hidden, teacher_hidden, layer_map: list[int]) -> torch.Tensor:
    """Mean (1 - cosine) between student layer i's output and teacher layer layer_map[i]'s output.

    hidden_states[0] is the embedding output, so layer j's output is hidden_states[j + 1].
    """
    losses = [
        1 - F.cosine_similarity(student_hidden[i + 1].float(), teacher_hidden[j + 1].float(), dim=-1).mean()
        for i, j in enumerate(layer_map)
    ]
    return torch.stack(losses).mean()


def distill_loss(student_out, teacher_out, input_ids, alpha, temperature, hidden_weight=0.0, layer_map=None):
    """Total loss and its parts (detached floats) for logging."""
    ce = next_token_ce(student_out.logits, input_ids)
    parts = {"ce": ce}
    loss = (1 - alpha) * ce
    if teacher_out is not None and alpha > 0:
        # The last position predicts past the block; its target exists for neither model, so it is dropped.
        kl = kd_kl(student_out.logits[:, :-1], teacher_out.logits[:, :-1], temperature)
        parts["kl"] = kl
        loss = loss + alpha * kl
    if teacher_out is not None and hidden_weight > 0:
        cos = hidden_cosine(student_out.hidden_states, teacher_out.hidden_states, layer_map)
        parts["cos"] = cos
        loss = loss + hidden_weight * cos
    return loss, {k: v.item() for k, v in parts.items()}
