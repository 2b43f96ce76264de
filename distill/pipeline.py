"""The whole job, top to bottom: teacher -> student -> data -> train (and baseline) -> save -> evaluate -> report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_seed

from distill.config import DistillConfig
from distill.data import data_sources, generated_path, heldout_split, load_blocks
from distill.evaluate import evaluate
from distill.generate import generate_texts, save_jsonl
from distill.report import write_report
from distill.student import build_student, count_params
from distill.teacher import load_teacher, load_tokenizer
from distill.train import make_accelerator, throughput, train_student


def prepare_blocks(cfg: DistillConfig, tokenizer, accelerator) -> dict:
    """The main process tokenizes and caches; the others then read the cache."""
    if accelerator.is_main_process:
        blocks = load_blocks(cfg, tokenizer)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        blocks = load_blocks(cfg, tokenizer)
    return blocks


def save_student(model, tokenizer, folder: Path) -> None:
    """An HF folder transformers loads: safetensors, config, tokenizer with the chat template."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def describe_params(teacher, student) -> dict:
    params = {"teacher": count_params(teacher), "student": count_params(student)}
    t, s = params["teacher"], params["student"]
    print(
        f"teacher: {t['total']:,} parameters ({t['layers']:,} in {teacher.config.num_hidden_layers} layers)\n"
        f"student: {s['total']:,} parameters ({s['layers']:,} in {student.config.num_hidden_layers} layers), "
        f"{s['total'] / t['total']:.1%} of the teacher, {s['layers'] / t['layers']:.1%} of its layer parameters"
    )
    return params


def hardware(accelerator) -> dict:
    device = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else "cpu"
    return {"processes": accelerator.num_processes, "device": device, "precision": accelerator.mixed_precision}


def run_generate(cfg: DistillConfig) -> Path:
    accelerator = make_accelerator(cfg)
    tokenizer, teacher = load_tokenizer(cfg.teacher), load_teacher(cfg.teacher)
    teacher.to(accelerator.device)
    path = generated_path(cfg)
    with accelerator.autocast():
        batches = generate_texts(teacher, tokenizer, cfg, accelerator.device)
        save_jsonl(batches, path, progress=lambda n: print(f"{n}/{cfg.generate_n} texts", flush=True))
    return path


def run_train(cfg: DistillConfig, resume: bool = False) -> dict | None:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    tokenizer, teacher = load_tokenizer(cfg.teacher), load_teacher(cfg.teacher)
    if cfg.generate_n and not cfg.data and not generated_path(cfg).exists() and accelerator.is_main_process:
        teacher.to(accelerator.device)
        with accelerator.autocast():
            save_jsonl(generate_texts(teacher, tokenizer, cfg, accelerator.device), generated_path(cfg))
    accelerator.wait_for_everyone()
    blocks = prepare_blocks(cfg, tokenizer, accelerator)
    student, layer_map = build_student(teacher, cfg)
    params = describe_params(teacher, student) if accelerator.is_main_process else None
    runs = {}
    student, runs["student"] = train_student(cfg, "student", student, teacher, blocks, accelerator, layer_map, resume)
    if accelerator.is_main_process:
        save_student(student, tokenizer, cfg.out / "student")
    if cfg.baseline:
        set_seed(cfg.seed)
        baseline, _ = build_student(teacher, cfg)  # same seed, same init as the distilled student
        baseline, runs["baseline"] = train_student(cfg, "baseline", baseline, teacher, blocks, accelerator, layer_map, resume, alpha=0.0)
        if accelerator.is_main_process:
            save_student(baseline, tokenizer, cfg.out / "baseline")
    report = None
    if accelerator.is_main_process:
        save_history(cfg, runs, hardware(accelerator), layer_map)
        models = {"teacher": teacher, "student": student, **({"baseline": baseline} if cfg.baseline else {})}
        report = make_report(cfg, models, blocks, accelerator, layer_map)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def save_history(cfg: DistillConfig, runs: dict, hw: dict, layer_map) -> None:
    history = {
        name: {"steps": state.step, "train_log": state.train_log, "eval_log": state.eval_log, "throughput": throughput(state)}
        for name, state in runs.items()
    }
    record = {"runs": history, "hardware": hw, "layer_map": layer_map}
    (cfg.out / "history.json").write_text(json.dumps(record, indent=2))


def make_report(cfg: DistillConfig, models: dict, blocks: dict, accelerator, layer_map) -> dict:
    """Final held-out evaluation of every model against the teacher, written as report.{json,md,png}."""
    teacher = models["teacher"].to(accelerator.device)
    models = {n: m.to(accelerator.device) for n, m in models.items()}
    metrics = evaluate(models, blocks["val"], cfg.batch_size, accelerator, teacher=teacher)
    by_source = {
        source: evaluate(models, blocks[heldout_split(i)], cfg.batch_size, accelerator, teacher=teacher)
        for i, source in enumerate(data_sources(cfg))
        if len(blocks.get(heldout_split(i), ()))
    }
    history_path = cfg.out / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {"runs": {}, "hardware": hardware(accelerator)}
    report = {
        "config": cfg.to_dict(),
        "metrics": metrics,
        "metrics_by_source": by_source,
        "params": {n: count_params(m) for n, m in models.items()},
        "layer_map": layer_map,
        "data_tokens": {s: int(b.size) for s, b in blocks.items()},
        "runs": history["runs"],
        "hardware": history["hardware"],
    }
    write_report(cfg.out, report)
    for name, m in metrics.items():
        agree = f", agreement {m['agreement']:.1%}" if name != "teacher" else ""
        print(f"{name}: held-out ppl {m['ppl']:.3f}{agree}")
    for source, source_metrics in by_source.items():
        print(f"{source}: " + ", ".join(f"{name} ppl {m['ppl']:.3f}" for name, m in source_metrics.items()))
    print(f"report: {cfg.out / 'report.md'}")
    return report


def run_eval(cfg: DistillConfig) -> dict:
    """Re-evaluate the saved student (and baseline, when present) of cfg.out_dir."""
    from transformers import AutoModelForCausalLM

    accelerator = make_accelerator(cfg)
    tokenizer, teacher = load_tokenizer(cfg.teacher), load_teacher(cfg.teacher)
    blocks = load_blocks(cfg, tokenizer)
    models = {"teacher": teacher}
    for name in ("student", "baseline"):
        folder = cfg.out / name
        if folder.exists():
            models[name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if "student" not in models:
        raise FileNotFoundError(f"no student in {cfg.out}: run `distill train` first")
    history_path = cfg.out / "history.json"
    layer_map = json.loads(history_path.read_text()).get("layer_map") if history_path.exists() else None
    return make_report(cfg, models, blocks, accelerator, layer_map)
