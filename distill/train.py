"""The training loop: one student (distilled, or the CE-only baseline), resumable, the same on CPU and GPUs.

Launch on several GPUs with HF accelerate, the config unchanged:
    accelerate launch --num_processes 2 -m distill train --config distill/configs/smollm2.toml
Each process draws its own micro-batches (a pure function of seed, step, micro-step
and rank), so the global batch is batch_size * grad_accum * processes blocks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from distill.config import DistillConfig
from distill.data import batch_indices
from distill.evaluate import evaluate
from distill.losses import distill_loss

KEEP_CHECKPOINTS = 2  # the newest two: a crash while writing one still leaves the other


@dataclass
class RunState:
    """What a checkpoint restores besides the weights and the optimizer."""

    step: int = 0
    train_log: list = field(default_factory=list)  # {step, loss, ce, kl?, cos?, lr, tok_s}
    eval_log: list = field(default_factory=list)  # {step, val_loss, val_ppl}
    step_times: list = field(default_factory=list)  # (seconds, tokens) per optimizer step, all processes


def make_accelerator(cfg: DistillConfig) -> Accelerator:
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    return Accelerator(mixed_precision="bf16" if use_bf16 else "no")


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg: DistillConfig):
    """AdamW with decay on matrices only: decaying norm gains and biases just shrinks them."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=torch.cuda.is_available())


# --- checkpoints -----------------------------------------------------------------


def checkpoint_dir(cfg: DistillConfig, name: str) -> Path:
    return cfg.out / "checkpoints" / name


def latest_checkpoint(cfg: DistillConfig, name: str) -> Path | None:
    found = sorted(checkpoint_dir(cfg, name).glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(cfg, name, model, optimizer, state: RunState, layer_map) -> Path:
    folder = checkpoint_dir(cfg, name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state.step:07d}.pt"
    payload = {
        "config": cfg.to_dict(),
        "student_config": model.config.to_dict(),
        "layer_map": layer_map,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state.__dict__,
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a half-written checkpoint never carries a final name
    for old in sorted(folder.glob("step_*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def load_checkpoint(path: Path):
    """(student model, payload) rebuilt from a checkpoint alone."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    config = AutoConfig.for_model(**payload["student_config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(payload["model"])
    return model, payload


# --- the loop --------------------------------------------------------------------


def get_batch(blocks: np.ndarray, cfg, step, micro, rank, device) -> torch.Tensor:
    idx = batch_indices(len(blocks), cfg.batch_size, cfg.seed, step, micro, rank)
    return torch.from_numpy(blocks[idx].astype(np.int64)).to(device, non_blocking=True)


def train_student(
    cfg: DistillConfig,
    name: str,
    student,
    teacher,
    blocks: dict,
    accelerator: Accelerator,
    layer_map=None,
    resume: bool = False,
    alpha: float | None = None,
) -> tuple:
    """Train `student` for cfg.max_steps; returns (unwrapped student, RunState).

    alpha=None takes cfg.alpha; the baseline passes alpha=0, which also skips the teacher's forward.
    """
    alpha = cfg.alpha if alpha is None else alpha
    hidden_weight = cfg.hidden_weight if alpha > 0 else 0.0
    use_teacher = alpha > 0 or hidden_weight > 0
    state = RunState()
    device = accelerator.device

    ckpt = latest_checkpoint(cfg, name) if resume else None
    if ckpt is not None:
        student, payload = load_checkpoint(ckpt)
        state = RunState(**payload["state"])
        torch.set_rng_state(payload["torch_rng"])
        accelerator.print(f"[{name}] resuming from {ckpt} at step {state.step}")
    student.to(device).train()
    optimizer = make_optimizer(student, cfg)
    if ckpt is not None:
        optimizer.load_state_dict(payload["optimizer"])
        del payload
    model, optimizer = accelerator.prepare(student, optimizer)
    if use_teacher:
        teacher.to(device)

    rank, world = accelerator.process_index, accelerator.num_processes
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=name, disable=not accelerator.is_main_process, dynamic_ncols=True)
    while state.step < cfg.max_steps:
        step = state.step
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        sums: dict = {}
        for micro in range(cfg.grad_accum):
            x = get_batch(blocks["train"], cfg, step, micro, rank, device)
            # Gradients are all-reduced once per optimizer step, not once per micro-batch.
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync:
                t_out = None
                if use_teacher:
                    with torch.no_grad(), accelerator.autocast():
                        t_out = teacher(x, output_hidden_states=hidden_weight > 0)
                s_out = model(x, output_hidden_states=hidden_weight > 0)
                loss, parts = distill_loss(s_out, t_out, x, alpha, cfg.temperature, hidden_weight, layer_map)
                accelerator.backward(loss / cfg.grad_accum)
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state.step += 1
        state.step_times.append((dt, tokens_per_step))
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.1e}")
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            state.train_log.append({"step": state.step, **sums, "lr": lr, "tok_s": tokens_per_step / dt})
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            periodic_eval(cfg, name, accelerator, model, state, blocks["val"])
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            checkpoint(cfg, name, accelerator, model, optimizer, state, layer_map)
    bar.close()
    if not cfg.checkpoint_every or state.step % cfg.checkpoint_every:
        checkpoint(cfg, name, accelerator, model, optimizer, state, layer_map)
    return accelerator.unwrap_model(model), state


def periodic_eval(cfg, name, accelerator, model, state: RunState, val_blocks) -> None:
    """A quick held-out loss on the first eval_batches micro-batches, on the main process only."""
    if accelerator.is_main_process:
        model.eval()
        metrics = evaluate({name: accelerator.unwrap_model(model)}, val_blocks, cfg.batch_size, accelerator, cfg.eval_batches)[name]
        model.train()
        state.eval_log.append({"step": state.step, "val_loss": metrics["loss"], "val_ppl": metrics["ppl"]})
        tqdm.write(f"[{name}] step {state.step}: held-out loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}")
    accelerator.wait_for_everyone()


def checkpoint(cfg, name, accelerator, model, optimizer, state, layer_map) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(cfg, name, accelerator.unwrap_model(model), optimizer, state, layer_map)
    accelerator.wait_for_everyone()


def throughput(state: RunState, skip: int = 5) -> dict:
    """Tokens per second over all processes, leaving out the first steps (allocator and kernel warm-up)."""
    times = state.step_times[skip:] or state.step_times
    seconds = sum(t for t, _ in times)
    tokens = sum(n for _, n in times)
    return {"tokens_per_s": tokens / seconds if seconds else 0.0, "steps_timed": len(times), "seconds": seconds}
