"""What constrained decoding costs: aggregate tok/s with and without a json_schema, at 1 and 8 streams.

Three measurements, one run, on the bundled model through llama.cpp:
- Through the service: each level sends the same chat requests with and without a ``json_schema`` response
  format, alternating, several rounds; aggregate tok/s is the tokens of a level's requests over its wall time.
  The schema (a long array of records) cannot be finished within ``max_tokens``, so both modes generate the
  same number of tokens and only the per-token cost differs. Goal: constrained >= 0.9x unconstrained.
- Inside the runner's own code: the time to fill one sequence's mask and apply it, per token, beside the
  time of the decode step it rides on.
- Schema compile time: the service's compile-and-validate and the runner's first matcher, per test schema.

    python -m bench.constrained --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from appliance.config import default_threads
from bench.common import start_service, stream_completion
from bench.results import command_line, record
from models import find_model

GOAL = 0.9
LEVELS = (1, 8)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "role": {"enum": ["engineer", "nurse", "teller"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "floor": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["city", "floor"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "role", "address", "skills"], "additionalProperties": False,
}
ROSTER = {"type": "array", "items": PERSON, "minItems": 40}  # longer than max_tokens: both modes run to the end
WEATHER_CALL = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}
SCHEMAS = {"person": PERSON, "roster": ROSTER, "weather arguments": WEATHER_CALL}
ASK = "List the workers at our site, with their roles, addresses and skills."


def level(port: int, clients: int, per_client: int, max_tokens: int, schema: dict | None, seed: int) -> dict:
    """``clients`` streams at once, each sending ``per_client`` requests in a row: tokens and wall time."""
    tokens, failures = [], []

    def client(index: int) -> None:
        for i in range(per_client):
            body = {"messages": [{"role": "user", "content": ASK}], "max_tokens": max_tokens, "temperature": 1.0,
                    "seed": seed + index * 100 + i, "stream": True, "stream_options": {"include_usage": True}}
            if schema is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "roster", "schema": schema}}
            try:
                tokens.append(stream_completion(port, body, path="/v1/chat/completions")["usage"]["completion_tokens"])
            except Exception as exc:  # counted, never hidden
                failures.append(str(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"tokens": sum(tokens), "wall_s": wall, "tok_s": sum(tokens) / wall, "failures": failures}


def through_the_service(threads: int, rounds: int, max_tokens: int) -> dict:
    proc, port = start_service(threads, args=["--parallel", str(max(LEVELS))])
    try:
        level(port, 1, 1, 8, ROSTER, seed=0)  # warm: the first constrained request builds the vocabulary
        runs = {f"{mode}@{c}": [] for c in LEVELS for mode in ("free", "json_schema")}
        for r in range(rounds):
            for clients in LEVELS:
                for mode, schema in (("free", None), ("json_schema", ROSTER)):
                    result = level(port, clients, 2, max_tokens, schema, seed=r * 1000)
                    runs[f"{mode}@{clients}"].append(result)
                    print(f"round {r} {clients} streams {mode:<11} {result['tok_s']:6.1f} tok/s "
                          f"({result['tokens']} tokens, {result['wall_s']:.1f} s, {len(result['failures'])} failed)",
                          flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    levels = {}
    for clients in LEVELS:
        free = statistics.median(x["tok_s"] for x in runs[f"free@{clients}"])
        constrained = statistics.median(x["tok_s"] for x in runs[f"json_schema@{clients}"])
        levels[clients] = {"free_tok_s": free, "json_schema_tok_s": constrained, "ratio": constrained / free,
                           "failures": sum(len(x["failures"]) for k in runs if k.endswith(f"@{clients}")
                                           for x in runs[k])}
    return {"levels": levels, "runs": runs}


def inside_the_runner(threads: int, tokens: int) -> dict:
    """Per token: the mask (fill + apply) against the decode step, on one sequence of the roster schema."""
    import numpy as np
    import llama_cpp

    from appliance.backends.base import Feed, SamplingParams
    from appliance.backends.llama_cpp import LlamaCppBackend
    from appliance.grammar import apply_mask, grammars_for, json_schema_grammar
    from appliance.runner.prompt import chat_tokens

    backend = LlamaCppBackend(find_model("smollm2-135m-instruct").path, threads=threads, context_length=2048, n_slots=1)
    facts = backend.load()
    grammars = grammars_for(backend, facts.n_vocab)
    constraint = grammars.constraint(json_schema_grammar(ROSTER))
    prompt = chat_tokens(backend, [{"role": "user", "content": ASK}])
    backend.start_sequence(0, 0, SamplingParams(temperature=1.0, seed=1))
    mask_s, step_s, pos, feed = [], [], 0, prompt
    for _ in range(tokens):
        started = time.perf_counter()
        outputs = backend._decode([Feed(0, feed, pos, sample=True)])
        decoded = time.perf_counter()
        (_, index), = outputs
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(backend._ctx, index), shape=(facts.n_vocab,))
        apply_mask(logits, constraint.mask())
        masked = time.perf_counter()
        token = llama_cpp.llama_sampler_sample(backend._samplers[0], backend._ctx, index)
        constraint.advance(token)
        if feed is not prompt:  # the prefill is no decode step
            step_s.append(decoded - started)
            mask_s.append(masked - decoded)
        pos, feed = pos + len(feed), [token]
    backend.close()
    return {"tokens": len(mask_s), "mask_us_median": statistics.median(mask_s) * 1e6,
            "mask_us_p90": sorted(mask_s)[int(len(mask_s) * 0.9)] * 1e6,
            "step_ms_median": statistics.median(step_s) * 1e3,
            "mask_share_of_step": statistics.median(mask_s) / statistics.median(step_s)}


def compile_times() -> dict:
    """ms to compile and validate each schema (the service, per new schema) and to build its first matcher."""
    from appliance import grammar
    from appliance.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(find_model("smollm2-135m-instruct").path, threads=1, context_length=512, n_slots=1)
    facts = backend.load()
    grammars = grammar.grammars_for(backend, facts.n_vocab)
    started = time.perf_counter()
    grammars.constraint(grammar.json_schema_grammar(None))
    out = {"vocabulary_ms": (time.perf_counter() - started) * 1e3}
    for name, schema in SCHEMAS.items():
        grammar._compiled.cache_clear()
        started = time.perf_counter()
        compiled = grammar.json_schema_grammar(schema)
        service = time.perf_counter()
        grammars._matchers.clear()
        grammars.constraint(compiled)
        out[name] = {"service_ms": (service - started) * 1e3, "runner_ms": (time.perf_counter() - service) * 1e3}
    backend.close()
    return out


def report(data: dict) -> str:
    lines = ["# Constrained decoding's cost", "",
             f"Bundled model (SmolLM2-135M Q4_1) on llama.cpp, {data['threads']} threads, {data['rounds']} rounds, "
             f"max_tokens {data['max_tokens']}, temperature 1. Medians.", "",
             "| streams | free tok/s | json_schema tok/s | ratio | goal | failed |", "|---|---|---|---|---|---|"]
    for clients, x in data["service"]["levels"].items():
        lines.append(f"| {clients} | {x['free_tok_s']:.1f} | {x['json_schema_tok_s']:.1f} | {x['ratio']:.2f}x | "
                     f"{'met' if x['ratio'] >= GOAL else 'MISSED'} (>= {GOAL}x) | {x['failures']} |")
    inner = data["runner"]
    lines += ["", f"Inside the runner, one sequence, {inner['tokens']} tokens: the mask takes "
              f"{inner['mask_us_median']:.0f} µs per token (p90 {inner['mask_us_p90']:.0f} µs) beside a "
              f"{inner['step_ms_median']:.1f} ms decode step ({inner['mask_share_of_step'] * 100:.1f}%).", "",
              f"Compile times (the vocabulary, once per model: {data['compile']['vocabulary_ms']:.0f} ms):", "",
              "| schema | service (compile + validate) ms | runner (first matcher) ms |", "|---|---|---|"]
    for name, x in data["compile"].items():
        if isinstance(x, dict):
            lines.append(f"| {name} | {x['service_ms']:.1f} | {x['runner_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args(argv)
    data = {"threads": args.threads, "rounds": args.rounds, "max_tokens": args.max_tokens,
            "compile": compile_times(), "runner": inside_the_runner(args.threads, args.max_tokens)}
    data["service"] = through_the_service(args.threads, args.rounds, args.max_tokens)
    text = report(data)
    print(text)
    worst = min(x["ratio"] for x in data["service"]["levels"].values())
    record("constrained", about="aggregate tok/s with and without a json_schema constraint, mask cost per token, "
           "schema compile time", goal=f"json_schema tok/s >= {GOAL}x free at 1 and 8 streams",
           figure=f"worst ratio {worst:.2f}x; mask {data['runner']['mask_us_median']:.0f} µs/token",
           command=command_line("constrained", argv), report=text, data=data)


if __name__ == "__main__":
    main()
