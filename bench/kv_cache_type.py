"""llama.cpp's KV cache types: decode speed and agreement of q8_0 and q4_0 beside f16.

A model (the bundled one by default) through the service's own backend (appliance.backends.llama_cpp), on
whatever device its build offloads to (gpu_layers auto): one sequence at a time, and --streams sequences in
one batch, greedy. Agreement: of each sequence's greedy tokens in the batch, the share each quantized cache
gives exactly as f16 does, and how many come before the first difference (after it, the texts differ as any
two sampled answers would). The KV cache's size is what llama.cpp reports at load.

    python -m bench.kv_cache_type --tokens 128                    # this CPU, 4 streams
    python -m bench.kv_cache_type --model M.gguf --streams 64     # a CUDA build: issue 27's 64 streams
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from appliance.backends.base import Feed, SamplingParams, token_stream
from appliance.backends.llama_cpp import LlamaCppBackend
from appliance.config import KV_CACHE_TYPES, default_threads
from appliance.runner.prompt import chat_tokens
from bench.results import command_line, record
from models import find_model

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works, step by step.",
           "List twenty animals and one fact about each.", "Describe the water cycle in detail.",
           "What should a new nurse know on the first day?", "Give me ten tips for saving money."]
CONTEXT = 1024


def load(model: str, kv: str, threads: int, slots: int) -> tuple[LlamaCppBackend, object, float]:
    backend = LlamaCppBackend(model, threads=threads, context_length=CONTEXT, n_slots=slots, kv_cache_type=kv)
    facts = backend.load()
    return backend, facts, facts.info["kv_cache_mib"] / slots


def greedy(backend, facts, prompt: str, tokens: int) -> tuple[list[int], float]:
    """The greedy tokens of one prompt and the decode tok/s (the prefill's first token left out)."""
    stream = token_stream(backend, facts, chat_tokens(backend, [{"role": "user", "content": prompt}]),
                          SamplingParams(temperature=0))
    out = [next(stream)]
    started = time.perf_counter()
    out += [next(stream) for _ in range(tokens - 1)]
    return out, (tokens - 1) / (time.perf_counter() - started)


def batched(backend, facts, streams: int, tokens: int) -> tuple[list[list[int]], float]:
    """`streams` sequences decoding together (the prompts in turn): each one's greedy tokens, and the tokens of
    all of them per second of their decode steps."""
    params = SamplingParams(temperature=0)
    feeds, out, total, elapsed = [], [], 0, 0.0
    for slot in range(streams):
        backend.start_sequence(slot, 0, params)
        ids = chat_tokens(backend, [{"role": "user", "content": PROMPTS[slot % len(PROMPTS)]}])
        token = backend.step([Feed(slot, ids, 0, sample=True)])[slot]
        feeds.append(Feed(slot, [token], len(ids), sample=True))
        out.append([token])
    for _ in range(tokens - 1):
        started = time.perf_counter()
        sampled = backend.step(feeds)
        elapsed += time.perf_counter() - started
        total += len(feeds)
        feeds = [Feed(f.slot, [sampled[f.slot]], f.pos + 1, sample=True) for f in feeds]
        for f in feeds:
            out[f.slot].append(f.tokens[0])
    return out, total / elapsed


def measure(model: str, kv: str, threads: int, streams: int, tokens: int) -> dict:
    backend, facts, kv_mib = load(model, kv, threads, slots=1)
    device = facts.info.get("device", "")
    runs = [greedy(backend, facts, prompt, tokens) for prompt in PROMPTS]
    backend.close()
    backend, facts, _ = load(model, kv, threads, slots=streams)
    together, tok_s = batched(backend, facts, streams, tokens)
    backend.close()
    return {"kv_mib_per_slot": kv_mib, "device": device, "tokens": together,
            "tok_s_1": statistics.median(r[1] for r in runs), "tok_s_n": tok_s}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of tokens equal to the reference's at the same place, median tokens before the first difference)."""
    same = sum(a == b for seq, ref in zip(tokens, reference) for a, b in zip(seq, ref))
    prefixes = [next((i for i, (a, b) in enumerate(zip(seq, ref)) if a != b), len(ref))
                for seq, ref in zip(tokens, reference)]
    return same / sum(len(ref) for ref in reference), statistics.median(prefixes)


def report(data: dict) -> str:
    n = data["streams"]
    lines = [f"# KV cache types on {data['device']}", "",
             f"{data['model']}, {data['threads']} threads, context {CONTEXT} per slot, {len(PROMPTS)} prompts x "
             f"{data['tokens']} greedy tokens. Decode tok/s: median over the prompts (1 stream); {n} sequences in "
             f"one batch, the prompts in turn ({n} streams). Agreement with f16: the {n} batched sequences.", "",
             f"| KV cache | MiB per slot | tok/s, 1 stream | vs f16 | tok/s, {n} streams | vs f16 | same tokens as f16 | "
             "tokens before the first difference (median) |", "|---|---|---|---|---|---|---|---|"]
    base = data["types"]["f16"]
    for kv, x in data["types"].items():
        lines.append(f"| {kv} | {x['kv_mib_per_slot']:.1f} | {x['tok_s_1']:.1f} | {x['tok_s_1'] / base['tok_s_1']:.2f}x | "
                     f"{x['tok_s_n']:.1f} | {x['tok_s_n'] / base['tok_s_n']:.2f}x | {x['agreement'] * 100:.0f}% | "
                     f"{x['first_difference']:.0f} of {data['tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--streams", type=int, default=4, help="sequences decoding in one batch (default 4)")
    parser.add_argument("--model", help="a GGUF (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--label", help="the run's id in bench/results/kv_cache_type/runs/<date>-<id>")
    args = parser.parse_args(argv)
    model = args.model or str(find_model("smollm2-135m-instruct").path)
    types = {kv: measure(model, kv, args.threads, args.streams, args.tokens) for kv in KV_CACHE_TYPES}
    for kv, x in types.items():
        x["agreement"], x["first_difference"] = agreement(x["tokens"], types["f16"]["tokens"])
    device = types["f16"]["device"] or "CPU"
    data = {"threads": args.threads, "tokens": args.tokens, "streams": args.streams, "device": device,
            "model": Path(model).name,
            "types": {kv: {k: v for k, v in x.items() if k not in ("tokens", "device")} for kv, x in types.items()}}
    text = report(data)
    print(text)
    q8 = data["types"]["q8_0"]
    f16 = data["types"]["f16"]
    record("kv_cache_type", about="llama.cpp KV cache types: decode speed, agreement with f16, size",
           goal="measure q8_0 and q4_0 beside f16 (issue 27: at 64 streams on a GPU)",
           figure=f"{device}: q8_0 {q8['tok_s_1'] / f16['tok_s_1']:.2f}x f16 at 1 stream, "
                  f"{q8['tok_s_n'] / f16['tok_s_n']:.2f}x at {args.streams}, "
                  f"{q8['agreement'] * 100:.0f}% same tokens, {q8['kv_mib_per_slot']:.1f} MiB per slot",
           command=command_line("kv_cache_type", argv), report=text, data=data, label=args.label,
           inputs=[Path(model)])


if __name__ == "__main__":
    main()
