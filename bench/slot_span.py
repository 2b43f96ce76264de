"""Which slots a batch uses changes its speed: llama.cpp's per-slot KV streams are attended as one range.

With ``kv_unified`` off (one KV stream per slot, what keeps batched greedy answers identical to answers
alone), a decode's KV views cover the streams from the lowest slot in the batch to the highest
(``ns = s1 - s0 + 1`` in llama-kv-cache.h). Four sequences in slots 0-3 attend over 4 streams; the same
four in slots 0, 2, 5 and 7 over 8. This measures decode tok/s of the same four sequences placed both
ways, alternated, through the service's own backend, and so why the runner keeps its busy slots packed.

    python -m bench.slot_span [--repeats 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

from appliance.backends import create_backend
from appliance.backends.base import Feed, SamplingParams
from appliance.config import default_threads
from bench.common import PROMPTS, machine
from bench.results import command_line, record
from models import find_model

PLACEMENTS = {"packed (slots 0-3)": [0, 1, 2, 3], "spread (slots 0, 2, 5, 7)": [0, 2, 5, 7],
              "high (slots 4-7)": [4, 5, 6, 7]}


def decode_tps(backend, slots: list[int], tokens: int) -> float:
    """Prefill one prompt per slot, then time ``tokens`` steps of one token each for all of them."""
    prompts = {s: backend.tokenize(PROMPTS[i % len(PROMPTS)], add_special=True, parse_special=False)
               for i, s in enumerate(slots)}
    for slot in slots:
        backend.start_sequence(slot, 0, SamplingParams(max_tokens=tokens, temperature=0.0))
    nxt = backend.step([Feed(s, p, 0, sample=True) for s, p in prompts.items()])
    pos = {s: len(p) for s, p in prompts.items()}
    start = time.perf_counter()
    for _ in range(tokens):
        nxt = backend.step([Feed(s, [nxt[s]], pos[s], sample=True) for s in slots])
        for s in slots:
            pos[s] += 1
    elapsed = time.perf_counter() - start
    backend.clear()
    return len(slots) * tokens / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    threads = default_threads()
    model = find_model("smollm2").path
    backend = create_backend("gguf", model, threads=threads, context_length=4096, n_slots=8)
    backend.load()
    runs = {name: [] for name in PLACEMENTS}
    for _ in range(args.repeats):
        for name, slots in PLACEMENTS.items():
            runs[name].append(decode_tps(backend, slots, args.tokens))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    packed = medians["packed (slots 0-3)"]
    lines = ["# Packed or spread: the slots of a batch and its decode speed", "",
             f"`python -m bench.slot_span --repeats {args.repeats} --tokens {args.tokens}` on {machine()['cpu']}: "
             f"SmolLM2-135M Q4_1, {threads} threads, 8 slots of 4,096 tokens (one KV stream each), 4 greedy "
             f"sequences decoding {args.tokens} tokens each; tok/s over all four, median of {args.repeats} "
             "alternated runs.", "",
             "| slots of the four sequences | decode tok/s | runs | vs packed |", "|---|---|---|---|"]
    for name, values in runs.items():
        lines.append(f"| {name} | {medians[name]:.1f} | {', '.join(f'{v:.0f}' for v in values)} | "
                     f"{medians[name] / packed:.2f} |")
    data = {"machine": machine(), "threads": threads, "tokens": args.tokens, "runs": runs, "medians": medians}
    run = record("slot_span", about=__doc__.splitlines()[0], goal="none: it shows why the runner keeps busy slots packed",
                 figure=figure(data), command=command_line("slot_span", argv), report="\n".join(lines) + "\n",
                 data=data, inputs=[model])
    print((run / "report.md").read_text())


def figure(data: dict) -> str:
    packed, *others = data["medians"].items()
    return ", ".join(f"{name} {tps / packed[1]:.2f}x" for name, tps in others) + f" the decode speed of {packed[0]}"


if __name__ == "__main__":
    main()
