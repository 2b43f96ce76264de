"""llama.cpp's KV cache types on this CPU: decode speed and agreement of q8_0 and q4_0 beside f16.

The bundled model through the service's own backend (appliance.backends.llama_cpp), one sequence at a time
and four in one batch, greedy. Agreement: of each prompt's greedy tokens, the share each quantized cache
gives exactly as f16 does, and how many come before the first difference (after it, the texts differ as
any two sampled answers would). The KV cache's size is what llama.cpp reports at load.

    python -m bench.kv_cache_type --tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def load(kv: str, threads: int, slots: int) -> tuple[LlamaCppBackend, object, float]:
    backend = LlamaCppBackend(find_model("smollm2-135m-instruct").path, threads=threads, context_length=CONTEXT,
                              n_slots=slots, kv_cache_type=kv)
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


def batched_tok_s(backend, facts, tokens: int) -> float:
    """Four sequences decoding together: tokens of all four per second of their decode steps."""
    params = SamplingParams(temperature=0)
    feeds, total, elapsed = [], 0, 0.0
    for slot, prompt in enumerate(PROMPTS[:4]):
        backend.start_sequence(slot, 0, params)
        ids = chat_tokens(backend, [{"role": "user", "content": prompt}])
        token = backend.step([Feed(slot, ids, 0, sample=True)])[slot]
        feeds.append(Feed(slot, [token], len(ids), sample=True))
    for _ in range(tokens - 1):
        started = time.perf_counter()
        sampled = backend.step(feeds)
        elapsed += time.perf_counter() - started
        total += len(feeds)
        feeds = [Feed(f.slot, [sampled[f.slot]], f.pos + 1, sample=True) for f in feeds]
    return total / elapsed


def measure(kv: str, threads: int, tokens: int) -> dict:
    backend, facts, kv_mib = load(kv, threads, slots=1)
    runs = [greedy(backend, facts, prompt, tokens) for prompt in PROMPTS]
    backend.close()
    backend, facts, _ = load(kv, threads, slots=4)
    batched = batched_tok_s(backend, facts, tokens)
    backend.close()
    return {"kv_mib_per_slot": kv_mib, "tokens": [r[0] for r in runs],
            "tok_s_1": statistics.median(r[1] for r in runs), "tok_s_4": batched}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of tokens equal to the reference's at the same place, median tokens before the first difference)."""
    same = sum(a == b for seq, ref in zip(tokens, reference) for a, b in zip(seq, ref))
    prefixes = [next((i for i, (a, b) in enumerate(zip(seq, ref)) if a != b), len(ref))
                for seq, ref in zip(tokens, reference)]
    return same / sum(len(ref) for ref in reference), statistics.median(prefixes)


def report(data: dict) -> str:
    lines = ["# KV cache types on CPU", "",
             f"Bundled SmolLM2-135M Q4_1, {data['threads']} threads, context {CONTEXT} per slot, {len(PROMPTS)} prompts x "
             f"{data['tokens']} greedy tokens. Decode tok/s: median over the prompts (1 stream); all four in one "
             "batch (4 streams).", "",
             "| KV cache | MiB per slot | tok/s, 1 stream | vs f16 | tok/s, 4 streams | vs f16 | same tokens as f16 | "
             "tokens before the first difference (median) |", "|---|---|---|---|---|---|---|---|"]
    base = data["types"]["f16"]
    for kv, x in data["types"].items():
        lines.append(f"| {kv} | {x['kv_mib_per_slot']:.1f} | {x['tok_s_1']:.1f} | {x['tok_s_1'] / base['tok_s_1']:.2f}x | "
                     f"{x['tok_s_4']:.1f} | {x['tok_s_4'] / base['tok_s_4']:.2f}x | {x['agreement'] * 100:.0f}% | "
                     f"{x['first_difference']:.0f} of {data['tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args(argv)
    types = {kv: measure(kv, args.threads, args.tokens) for kv in KV_CACHE_TYPES}
    for kv, x in types.items():
        x["agreement"], x["first_difference"] = agreement(x["tokens"], types["f16"]["tokens"])
    data = {"threads": args.threads, "tokens": args.tokens,
            "types": {kv: {k: v for k, v in x.items() if k != "tokens"} for kv, x in types.items()}}
    text = report(data)
    print(text)
    q8 = data["types"]["q8_0"]
    record("kv_cache_type", about="llama.cpp KV cache types on CPU: decode speed, agreement with f16, size",
           goal="measure q8_0 and q4_0 beside f16 (issue: GPU settings, the part a CPU can prove)",
           figure=f"q8_0: {q8['tok_s_1'] / data['types']['f16']['tok_s_1']:.2f}x f16 at 1 stream, "
                  f"{q8['agreement'] * 100:.0f}% same tokens, {q8['kv_mib_per_slot']:.1f} MiB per slot",
           command=command_line("kv_cache_type", argv), report=text, data=data)


if __name__ == "__main__":
    main()
