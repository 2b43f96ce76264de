"""report.json (everything), report.md (the table a person reads) and report.png (curves and bars)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the appliance or the GPU box
import matplotlib.pyplot as plt  # noqa: E402


def write_report(out: Path, report: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths


def _fmt_params(p: dict) -> str:
    return f"{p['total'] / 1e6:.1f}M ({p['layers'] / 1e6:.1f}M in layers)"


def markdown(r: dict) -> str:
    m, p = r["metrics"], r["params"]
    teacher_ppl = m["teacher"]["ppl"]
    lines = [
        f"# Distillation report: {r['config']['teacher']}",
        "",
        f"Held-out set: {m['teacher']['tokens']:,} next-token predictions from documents never trained on.",
        "",
        "| model | params | held-out ppl | ppl / teacher | top-1 agreement with teacher |",
        "|---|---|---|---|---|",
    ]
    for name in ("teacher", "student", "baseline"):
        if name in m:
            agree = m[name].get("agreement")
            lines.append(
                f"| {name} | {_fmt_params(p[name])} | {m[name]['ppl']:.3f} | {m[name]['ppl'] / teacher_ppl:.3f}x | "
                f"{'-' if name == 'teacher' or agree is None else f'{agree:.1%}'} |"
            )
    for source, sm in r.get("metrics_by_source", {}).items():
        lines += ["", f"Held-out documents of `{source}` alone: {sm['teacher']['tokens']:,} predictions.", "",
                  "| model | held-out ppl | ppl / teacher | top-1 agreement with teacher |", "|---|---|---|---|"]
        for name in ("teacher", "student", "baseline"):
            if name in sm:
                agree = sm[name].get("agreement")
                lines.append(f"| {name} | {sm[name]['ppl']:.3f} | {sm[name]['ppl'] / sm['teacher']['ppl']:.3f}x | "
                             f"{'-' if name == 'teacher' or agree is None else f'{agree:.1%}'} |")
    lines += ["", f"Student layers kept from the teacher: {r.get('layer_map')}", ""]
    lines += ["## Training", "", "| run | steps | tokens/s (all processes) | processes | device | precision |", "|---|---|---|---|---|---|"]
    for name, run in r.get("runs", {}).items():
        t = run["throughput"]
        lines.append(
            f"| {name} | {run['steps']} | {t['tokens_per_s']:,.0f} | {r['hardware']['processes']} | "
            f"{r['hardware']['device']} | {r['hardware']['precision']} |"
        )
    c = r["config"]
    lines += [
        "",
        f"Loss: {c['alpha']} * KL(teacher||student) at T={c['temperature']} (x T^2) + {1 - c['alpha']:.2f} * CE"
        + (f" + {c['hidden_weight']} * hidden cosine" if c["hidden_weight"] else "")
        + "; the baseline uses CE only, same architecture, init and steps.",
        f"Data: {c['data'] or 'teacher-generated texts'}; blocks of {c['block_size']} tokens; "
        f"{r.get('data_tokens', {})} tokens (train/held-out).",
        f"Optimizer: AdamW lr {c['lr']} -> {c['min_lr']} (warmup {c['warmup_steps']}, cosine), "
        f"global batch {c['batch_size']} x {c['grad_accum']} x {r['hardware']['processes']} blocks.",
        "",
        "![loss curves and perplexities](report.png)",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    fig, (ax_loss, ax_val, ax_bar) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, run in r.get("runs", {}).items():
        log = run["train_log"]
        if log:
            ax_loss.plot([e["step"] for e in log], [e["ce"] for e in log], label=f"{name}: train CE")
            if "kl" in log[0]:
                ax_loss.plot([e["step"] for e in log], [e["kl"] for e in log], "--", label=f"{name}: train KL x T^2")
        ev = run["eval_log"]
        if ev:
            ax_val.plot([e["step"] for e in ev], [e["val_ppl"] for e in ev], "o-", label=name)
    teacher_ppl = r["metrics"]["teacher"]["ppl"]
    ax_val.axhline(teacher_ppl, color="k", ls=":", label="teacher")
    ax_loss.set(title="training loss", xlabel="step", yscale="log")
    ax_val.set(title="held-out perplexity during training", xlabel="step", yscale="log")
    names = [n for n in ("teacher", "student", "baseline") if n in r["metrics"]]
    values = [r["metrics"][n]["ppl"] for n in names]
    bars = ax_bar.bar(names, values, color=["#555", "#1f77b4", "#ff7f0e"][: len(names)])
    ax_bar.bar_label(bars, fmt="%.2f")
    ax_bar.set(title="final held-out perplexity")
    for ax in (ax_loss, ax_val):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
