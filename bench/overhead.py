"""What the service costs on top of llama.cpp: decode speed and time to first token.

The same prompts run through raw llama-cpp-python (a minimal ``Llama.generate``
loop: the floor of any Python program) and through ``appliance serve`` over
HTTP with streaming, same model, same threads, interleaved round by round so
both see the same machine state. Greedy decoding with a fixed token budget
makes both sides generate the same tokens.

    python -m bench.overhead --rounds 9 --max-tokens 128 --threads 1 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from pathlib import Path

import llama_cpp

from appliance.backends import create_backend
from bench.common import PROMPTS, machine, middle_half, side_by_side, start_service, stream_completion, verdict
from bench.results import command_line, record
from models import find_model

GOAL = "decode >= 0.97x raw llama-cpp-python's, time-to-first-token overhead <= 5 ms (issue 2)"
# The hand-written notes behind the Makefile's -DGGML_OPENMP=OFF.
INVESTIGATION = "bench/results/overhead/runs/2026-11-27-openmp/report.md"


def build_prompts(model_path: Path, rounds: int) -> list[str]:
    """Chat-formatted prompts, each unique so no run reuses another's KV cache."""
    backend = create_backend("gguf", model_path, threads=1, context_length=4096)
    backend.load()
    prompts = [
        backend.render_chat([{"role": "user", "content": f"(run {i}) {PROMPTS[i % len(PROMPTS)]}"}])
        for i in range(rounds)
    ]
    backend.unload()
    return prompts


def raw_run(llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    first = last = None
    n = 0
    for token in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        llm.detokenize([token])
        last = time.perf_counter()
        first = first or last
        n += 1
        if n >= max_tokens:
            break
    return {"ttft_ms": (first - start) * 1000, "tokens": n, "decode_tps": (n - 1) / (last - first)}


def service_run(port: int, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    run = stream_completion(port, body)
    first, last, n = run["stamps"][0], run["stamps"][-1], run["usage"]["completion_tokens"]
    return {"ttft_ms": (first - run["start"]) * 1000, "tokens": n, "decode_tps": (n - 1) / (last - first),
            "server_decode_tps": server_logged_tps(port)}


def server_logged_tps(port: int) -> float:
    """Decode speed the service itself logged for the last request: no client-side parsing in it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/logs?limit=1")
    row = json.loads(conn.getresponse().read())["data"][0]
    conn.close()
    return row["tokens_per_s"]


def summarize(raw: list[dict], svc: list[dict]) -> dict:
    med = statistics.median
    ratios = [s["decode_tps"] / r["decode_tps"] for r, s in zip(raw, svc)]
    return {
        "decode_ratio_quartiles": middle_half(ratios),
        "raw_decode_tps_median": med(r["decode_tps"] for r in raw),
        "service_decode_tps_median": med(r["decode_tps"] for r in svc),
        "decode_ratio_median": med(ratios),
        "server_side_decode_ratio_median": med(s["server_decode_tps"] / r["decode_tps"] for r, s in zip(raw, svc)),
        "raw_ttft_ms_median": med(r["ttft_ms"] for r in raw),
        "service_ttft_ms_median": med(r["ttft_ms"] for r in svc),
        "ttft_overhead_ms_median": med(s["ttft_ms"] - r["ttft_ms"] for r, s in zip(raw, svc)),
        "same_token_counts": all(r["tokens"] == s["tokens"] for r, s in zip(raw, svc)),
    }


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    m = meta["machine"]
    lines = [
        "# Service overhead over raw llama-cpp-python",
        "",
        f"Model `{meta['model']}`, {meta['rounds']} rounds x {meta['max_tokens']} tokens, greedy; raw and service "
        f"interleaved round by round in one run on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"llama-cpp-python {m['llama_cpp_python']}, {meta['date']}. Medians of per-round pairs; load average "
        f"{meta['load_average'][0]:.1f} when the run began.",
        "",
        "| threads | raw decode tok/s | service decode tok/s | decode ratio (goal >= 0.97) | middle half of the per-round ratios | ratio as the service logs it | raw TTFT ms | service TTFT ms | TTFT overhead ms (goal <= 5) | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run["summary"]
        lines.append(
            f"| {run['threads']} | {s['raw_decode_tps_median']:.1f} | {s['service_decode_tps_median']:.1f} | "
            f"{s['decode_ratio_median']:.3f} {verdict(s['decode_ratio_quartiles'], 0.97)} | "
            f"{s['decode_ratio_quartiles'][0]:.2f}-{s['decode_ratio_quartiles'][1]:.2f} | "
            f"{s['server_side_decode_ratio_median']:.3f} | "
            f"{s['raw_ttft_ms_median']:.1f} | {s['service_ttft_ms_median']:.1f} | "
            f"{s['ttft_overhead_ms_median']:.2f} {'✅' if s['ttft_overhead_ms_median'] <= 5 else '❌'} | {s['same_token_counts']} |"
        )
    lines += [
        "",
        "Decode tokens/s counts from the first token to the last (the first token's time is prefill). The service's",
        "time to first token includes HTTP, JSON parsing, validation, tokenization, the SQLite row and SSE framing;",
        "the service side is measured by a streaming HTTP client in the benchmark process. \"Ratio as the service logs",
        "it\" uses the tokens/s of the service's own SQLite row (first chunk to last, measured where the chunks are",
        "handed to the HTTP server), so the client's parsing is not in it; the client still shares the CPU.",
        "",
        "Reading: llama.cpp is built with `-DGGML_OPENMP=OFF` (the Makefile's setting); with OpenMP it decodes about",
        f"25% slower from a worker thread, where a WSGI server runs every request ({INVESTIGATION}).",
        "When inference threads take every core, the HTTP client, the server's I/O thread and the JSON per token",
        "share those cores with llama.cpp's threads. A verdict is given only where the middle half of the per-round",
        "ratios is on one side of the goal.",
        "",
        f"Reproduce: `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def figure(data: dict) -> str:
    runs = data["runs"]
    ratios = " / ".join(f"{r['summary']['decode_ratio_median']:.3f}x" for r in runs)
    ttft = " / ".join(f"{r['summary']['ttft_overhead_ms_median']:.1f}" for r in runs)
    threads = " / ".join(str(r["threads"]) for r in runs)
    return f"decode {ratios} raw llama-cpp-python's at {threads} threads; TTFT overhead {ttft} ms"


def write_report(meta: dict, runs: list[dict], model: Path) -> Path:
    data = {"meta": meta, "runs": runs}
    run = record("overhead", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(data), command=meta["command"],
                 report=markdown(data), data=data, inputs=[model])
    return run / "report.md"


def bench_threads(entry, prompts: list[str], threads: int, max_tokens: int) -> dict:
    llm = llama_cpp.Llama(str(entry.path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
    proc, port = start_service(threads)
    try:
        raw, svc = side_by_side(
            prompts, lambda prompt: raw_run(llm, prompt, max_tokens), lambda prompt: service_run(port, prompt, max_tokens),
            f"threads {threads}",
            lambda r, s: f"raw {r['decode_tps']:.1f} tok/s ttft {r['ttft_ms']:.1f} ms | "
                         f"service {s['decode_tps']:.1f} tok/s ttft {s['ttft_ms']:.1f} ms ({s['tokens']} tokens)",
        )
    finally:
        proc.terminate()
        proc.wait(30)
        llm.close()
    return {"threads": threads, "summary": summarize(raw, svc), "raw": raw, "service": svc}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="inference thread counts to measure (default: 1 and all cores)")
    args = parser.parse_args(argv)

    entry = find_model(args.model)
    load_average = os.getloadavg()
    prompts = build_prompts(entry.path, args.rounds + 1)
    runs = [bench_threads(entry, prompts, t, args.max_tokens) for t in args.threads]
    meta = {"model": entry.name, "rounds": args.rounds, "max_tokens": args.max_tokens, "load_average": load_average,
            "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line("overhead", argv)}
    for run in runs:
        print(run["threads"], json.dumps(run["summary"]))
    print("report:", write_report(meta, runs, entry.path))


if __name__ == "__main__":
    main()
