"""What quantization cost: perplexity, greedy agreement, size, decode speed and memory of a package.

Every number compares the package with the HF source it was exported from,
on the same token ids (tokenized once, by the source's tokenizer), so the
GGUF and ONNX packages of one export are measured on the same text.
Decode speed and peak RSS come from a fresh subprocess per package, so one
package's memory never counts against another's (and torch is not loaded there).
``write_report`` puts the numbers in the package as report.json and report.md.

    python -m distill.export_report speed {gguf,onnx} PATH [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distill.export_request import ExportRequest, Progress, step
from distill.targets import TargetProfile

# Held-out text: written for this report, so no model was trained on it.
HELD_OUT_TEXT = """\
The maintenance crew reached the pumping station a little after dawn, when the river fog was still lying in the
low fields. Their job that morning was simple on paper: replace a worn bearing on the second pump, check the
pressure sensors, and be back before the afternoon shift needed the road. In practice, nothing at the station was
ever simple. The building had been extended three times, each time by a different contractor, and the wiring
diagrams in the control room described a plant that no longer existed.

Mara, who had worked there for eleven years, kept her own notebook. It listed which breakers actually fed which
motors, which valves stuck in cold weather, and which alarms could be ignored because they had been miswired since
the last renovation. New engineers usually laughed at the notebook until their first night shift alone.

By nine o'clock the old bearing was out. It was scored and discoloured, as expected, but the shaft beneath it was
in better condition than anyone had hoped. The replacement went in cleanly. While the grease settled, the crew
walked the pipe gallery with a handheld meter, reading each sensor and comparing it with the value shown upstairs.
Two sensors disagreed by more than the tolerance allowed, and one of them turned out to be reading the wrong pipe
entirely: a label had been swapped during a repair the previous winter.

They corrected the label, logged the discrepancy, and restarted the pump. For a few seconds the vibration rose,
then fell to a steady hum that Mara judged, by ear, to be better than it had sounded in months. The meter agreed
with her. On the drive back, the fog had lifted, and the river was bright and quiet under a clear sky.

A heat pump moves heat instead of making it. Inside the outdoor unit, a refrigerant evaporates at a low
temperature and absorbs warmth from the air, even when the air feels cold to us. A compressor then squeezes the
vapour, which raises both its pressure and its temperature. The hot vapour flows to a coil indoors, where it
condenses back into a liquid and releases its heat into the room. Finally, the liquid passes through an expansion
valve, its pressure drops, and the cycle starts again. Because most of the delivered heat is taken from outside,
a heat pump can provide three or four units of heat for every unit of electricity it uses. The ratio falls as the
outdoor temperature drops, which is why installers size the system for the coldest week of the year rather than
for an average day. In summer the same machine can run in reverse and cool the house.

If you want to keep a small vegetable garden on a balcony, start with the light. Watch how many hours of direct
sun the balcony gets on a clear day: tomatoes and peppers need at least six, while lettuce, spinach and most herbs
are content with four. Next, choose containers that are deeper than you think you need, because shallow pots dry
out within hours in July. Fill them with a light potting mix rather than garden soil, which compacts and drains
poorly. Water in the early morning, and check the soil with your finger before watering again. Finally, keep a
short notebook of what you planted and when. By the second season, it will be the most useful tool you own.
"""
PROMPTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips for staying focused while studying.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain what a pump bearing does, in two sentences.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the bicycle begins in",
    "<|im_start|>user\nWrite a Python function that returns the largest of three numbers.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhy do leaves change colour in autumn?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDraft a short note telling my team the meeting moved to Thursday.<|im_end|>\n<|im_start|>assistant\n",
    "To replace a worn bearing, the first step is",
)
NEW_TOKENS = 64
HELD_OUT_MAX_TOKENS = 2048  # one forward pass of the fp32 source and of each package
SPEED_TIMEOUT_S = 900  # a decode of 64 tokens never needs this long; a stuck one must not hang the export


@dataclass(frozen=True)
class Reference:
    """The HF source's own answers: what every package is compared against."""

    text_ids: list[int]
    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # NEW_TOKENS greedy tokens per prompt
    perplexity: float


# -- the source ----------------------------------------------------------------
def held_out_text(path: Path | None) -> str:
    """The text perplexities are compared on: a site's own file, or the built-in prose."""
    return HELD_OUT_TEXT if path is None else Path(path).read_text(encoding="utf-8", errors="replace")


def reference_from_hf(src: Path, prompts=PROMPTS, text: str = HELD_OUT_TEXT, new_tokens: int = NEW_TOKENS) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(src) / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    text_ids = tokenizer.encode(text).ids[:HELD_OUT_MAX_TOKENS]
    prompt_ids = [tokenizer.encode(p).ids for p in prompts]
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0].numpy()
        greedy = [
            model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=model.config.eos_token_id)[0, len(ids):].tolist()
            for ids in prompt_ids
        ]
    return Reference(text_ids, prompt_ids, greedy, perplexity(logits, text_ids))


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp of the mean negative log-likelihood of tokens[1:] given logits[:-1]."""
    logits = logits[:-1].astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - logits[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


# -- packages ------------------------------------------------------------------
class GgufScorer:
    """Logits of every position from llama.cpp (one forward pass, no sampling)."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 2048):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   logits_all=True, verbose=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()
        out = []
        for token in self.llm.generate(prompt, temp=0, top_k=1, repeat_penalty=1.0):
            out.append(token)
            if len(out) == n:
                return out
        return out


class OnnxScorer:
    """Logits of every position from ONNX Runtime (the served graph, empty KV cache)."""

    def __init__(self, folder: Path, threads: int, context: int = 4096):
        from appliance.backends import create_backend

        self.backend = create_backend("onnx", folder, threads=threads, context_length=context, provider="cpu")
        self.facts = self.backend.load()

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.backend.logits(tokens)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        from appliance.backends.base import SamplingParams, token_stream

        tokens = token_stream(self.backend, self.facts, prompt, SamplingParams(temperature=0))
        return [next(tokens) for _ in range(n)]


def scorer(fmt: str, path: Path, threads: int, context: int = 2048):
    """A package's scorer with room for context tokens (the held-out text, or a prompt and its answer)."""
    return GgufScorer(path, threads, n_ctx=context) if fmt == "gguf" else OnnxScorer(path, threads, context)


def teacher_forced_agreement(score, prompt: list[int], reference: list[int]) -> float:
    """Share of positions where the package's top token, given the reference prefix, is the reference token."""
    logits = score.logits(prompt + reference[:-1])[len(prompt) - 1:]
    return float(np.mean(logits.argmax(-1) == np.array(reference)))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def context_needed(ref: Reference) -> int:
    """Tokens a scorer must hold: the held-out text in one pass, or the longest prompt and its answer."""
    longest = max((len(p) + len(g) for p, g in zip(ref.prompt_ids, ref.greedy)), default=0)
    return max(2048, len(ref.text_ids), longest)


def quality(score, ref: Reference) -> dict:
    """Perplexity and agreement of one package against the source's reference answers."""
    forced = [teacher_forced_agreement(score, p, g) for p, g in zip(ref.prompt_ids, ref.greedy)]
    free = [common_prefix(score.greedy(p, len(g)), g) for p, g in zip(ref.prompt_ids, ref.greedy)]
    return {
        "perplexity": perplexity(score.logits(ref.text_ids), ref.text_ids),
        "greedy_agreement": float(np.mean(forced)),
        "greedy_agreement_per_prompt": forced,
        "free_running_identical_prefix": free,
    }


# -- speed and memory, in a fresh process -----------------------------------------
def measure_speed(fmt: str, path: Path, threads: int, tokens: int = NEW_TOKENS) -> dict:
    cmd = [sys.executable, "-m", "distill.export_report", "speed", fmt, str(path), "--tokens", str(tokens),
           "--threads", str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=SPEED_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"speed run of {path} took over {SPEED_TIMEOUT_S} s (is the machine oversubscribed?)") from None
    if done.returncode != 0:
        raise RuntimeError(f"speed run of {path} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _speed(fmt: str, path: Path, threads: int, tokens: int) -> dict:
    from appliance.backends import create_backend
    from appliance.backends.base import SamplingParams, token_stream

    start = time.perf_counter()
    backend = create_backend(fmt, path, threads=threads, context_length=2048, provider="cpu")
    facts = backend.load()
    loaded = time.perf_counter()
    prompt = backend.tokenize(PROMPTS[1], add_special=True, parse_special=True)
    stream = token_stream(backend, facts, prompt, SamplingParams(temperature=0))
    next(stream)  # the prefill and first token: not decode
    first = time.perf_counter()
    for _ in range(tokens - 1):
        next(stream)
    end = time.perf_counter()
    return {"decode_tokens_per_s": (tokens - 1) / (end - first), "load_s": loaded - start,
            "peak_rss_mb": peak_rss_mb(), "threads": threads}


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries the parent's peak over the exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


# -- the report ------------------------------------------------------------------
REPORT_JSON, REPORT_MD = "report.json", "report.md"


def write_report(request: ExportRequest, profile: TargetProfile, fmt: str, folder: Path, quantization: str,
                 reference: Reference, progress: Progress) -> dict:
    """Measure the package in folder against the reference, write report.json and report.md into it; returns the
    summary its manifest records."""
    model_path = next(folder.glob("*.gguf")) if fmt == "gguf" else folder
    with step(f"measure the {fmt} package (perplexity, greedy agreement)", progress):
        metrics = quality(scorer(fmt, model_path, request.threads, context_needed(reference)), reference)
    with step(f"measure the {fmt} package (decode tokens/s, peak RSS)", progress):
        metrics |= measure_speed(fmt, model_path, request.threads)
    report = build_report(request, profile, fmt, folder, quantization, reference, metrics)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_MD).write_text(render_markdown(report))
    return {k: report[k] for k in ("perplexity_ratio", "greedy_agreement", "size_vs_fp32")}


def build_report(request, profile, fmt, folder, quantization, reference, metrics) -> dict:
    fp32_bytes = source_fp32_bytes(request.src)
    model_bytes = sum(p.stat().st_size for p in _model_files(fmt, folder))
    return {
        "model": request.name, "target": profile.name, "format": fmt, "quantization": quantization,
        "profile": asdict(profile), "source": str(request.src.resolve()),
        "model_bytes": model_bytes, "fp32_bytes": fp32_bytes, "fp16_bytes": fp32_bytes // 2,
        "size_vs_fp32": model_bytes / fp32_bytes, "size_vs_fp16": model_bytes / (fp32_bytes / 2),
        "perplexity_fp32": reference.perplexity, "perplexity_int4": metrics["perplexity"],
        "perplexity_ratio": metrics["perplexity"] / reference.perplexity,
        "held_out_tokens": len(reference.text_ids),
        "held_out_text": request.held_out.name if request.held_out else "built-in English prose", "prompts": len(reference.prompt_ids),
        "new_tokens": len(reference.greedy[0]) if reference.greedy else 0,
        **{k: v for k, v in metrics.items() if k != "perplexity"},
        "machine": _machine(),
    }


def _model_files(fmt: str, folder: Path) -> list[Path]:
    return list(folder.glob("*.gguf")) if fmt == "gguf" else list(folder.glob("model.onnx*"))


def source_fp32_bytes(src: Path) -> int:
    """Bytes of the source's weights at fp32 (the parameter count times 4, whatever dtype they are stored in)."""
    from safetensors import safe_open

    total = 0
    for path in src.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            total += sum(4 * _numel(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}


def render_markdown(r: dict) -> str:
    mb = 1 / 1e6
    lines = [
        f"# {r['model']} for {r['target']}: {r['format']} {r['quantization']}", "",
        "| measure | value |", "|---|---|",
        f"| model files | {r['model_bytes'] * mb:.1f} MB |",
        f"| fp32 / fp16 source | {r['fp32_bytes'] * mb:.1f} MB / {r['fp16_bytes'] * mb:.1f} MB |",
        f"| size vs fp32 / fp16 | {r['size_vs_fp32']:.3f}x / {r['size_vs_fp16']:.3f}x |",
        f"| held-out perplexity fp32 -> INT4 ({r['held_out_tokens']} tokens of {r.get('held_out_text', 'built-in prose')}) | {r['perplexity_fp32']:.3f} -> "
        f"{r['perplexity_int4']:.3f} ({r['perplexity_ratio']:.3f}x) |",
        f"| greedy agreement with the source (teacher-forced, {r['prompts']} prompts x {r['new_tokens']} tokens) | "
        f"{r['greedy_agreement']:.1%} |",
        f"| identical free-running prefix per prompt (of {r['new_tokens']}) | "
        f"{', '.join(str(n) for n in r['free_running_identical_prefix'])} |",
        f"| decode speed ({r['threads']} threads) | {r['decode_tokens_per_s']:.1f} tokens/s |",
        f"| peak RSS (load + {r['new_tokens']} tokens, fresh process) | {r['peak_rss_mb']:.0f} MB |",
        f"| load time | {r['load_s']:.2f} s |", "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores. Source: `{r['source']}`.", "",
        "Teacher-forced agreement: the share of the source's greedy tokens that the package also ranks first "
        "when given the same prefix. The free-running prefix counts tokens until the first divergence.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="decode speed and peak RSS of one package")
    parser.add_argument("command", choices=["speed"])
    parser.add_argument("format", choices=["gguf", "onnx"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(_speed(args.format, args.path, args.threads, args.tokens)))


if __name__ == "__main__":
    main()
