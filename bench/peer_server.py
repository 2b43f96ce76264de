"""The appliance against llama-cpp-python's own OpenAI-compatible server, same model, same engine.

Both serve the bundled GGUF through the same llama.cpp build with the same
threads; the same streaming client sends each the same greedy completion
requests, interleaved round by round. Decode tokens/s counts SSE events with
text from the first to the last (both servers send one event per token here),
time to first token is from sending the request to the first text event.

    pip install -e '.[bench]'
    python -m bench.peer_server --rounds 9 --max-tokens 128 --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench.common import machine, middle_half, side_by_side, start_server, start_service, stream_completion, verdict
from bench.overhead import build_prompts
from bench.results import command_line, record
from models import find_model

GOAL = "decode >= 0.97x llama-cpp-python's own server in the middle half of the rounds (issue 3)"


def timed_stream(port: int, body: dict) -> dict:
    run = stream_completion(port, body)
    stamps = run["stamps"]
    return {"ttft_ms": (stamps[0] - run["start"]) * 1000, "events": len(stamps),
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def bench_threads(model: Path, prompts: list[str], threads: int, max_tokens: int) -> dict:
    ours, our_port = start_service(threads)
    peer, peer_port = start_server(
        lambda port: ["-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
                      "--n_threads_batch", str(threads), "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port)],
        ready_path="/v1/models",
    )
    def body(prompt: str) -> dict:
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}

    try:
        appliance, llama_server = side_by_side(
            prompts, lambda prompt: timed_stream(our_port, body(prompt)),
            lambda prompt: timed_stream(peer_port, body(prompt) | {"repeat_penalty": 1.0}),  # its default is 1.1; ours has none
            f"threads {threads}",
            lambda a, b: f"appliance {a['decode_tps']:.1f} tok/s ttft {a['ttft_ms']:.0f} ms | "
                         f"llama_cpp.server {b['decode_tps']:.1f} tok/s ttft {b['ttft_ms']:.0f} ms",
        )
    finally:
        for proc in (ours, peer):
            proc.terminate()
            proc.wait(30)
    return {"threads": threads, "summary": summarize(appliance, llama_server), "appliance": appliance,
            "llama_cpp_server": llama_server}


def summarize(ours: list[dict], peer: list[dict]) -> dict:
    med = statistics.median
    ratios = [a["decode_tps"] / b["decode_tps"] for a, b in zip(ours, peer)]
    return {"appliance_decode_tps": med(a["decode_tps"] for a in ours),
            "llama_server_decode_tps": med(b["decode_tps"] for b in peer),
            "decode_ratio": med(ratios), "decode_ratio_quartiles": middle_half(ratios),
            "appliance_ttft_ms": med(a["ttft_ms"] for a in ours), "llama_server_ttft_ms": med(b["ttft_ms"] for b in peer),
            "same_event_counts": all(a["events"] == b["events"] for a, b in zip(ours, peer))}


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    m = meta["machine"]
    lines = [
        "# The appliance against llama-cpp-python's server",
        "",
        f"Model `{meta['model']}`, {meta['rounds']} rounds x {meta['max_tokens']} tokens, greedy, streamed; both servers "
        f"running side by side, requests interleaved round by round, on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"llama-cpp-python {m['llama_cpp_python']}, {meta['date']}; load average {meta['load_average'][0]:.1f} at the start.",
        "",
        "| threads | appliance decode tok/s | llama_cpp.server decode tok/s | ratio (median) | middle half of the rounds | appliance TTFT ms | llama_cpp.server TTFT ms | same token counts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run["summary"]
        q1, q3 = s["decode_ratio_quartiles"]
        lines.append(
            f"| {run['threads']} | {s['appliance_decode_tps']:.1f} | {s['llama_server_decode_tps']:.1f} | "
            f"{s['decode_ratio']:.3f} | {q1:.2f}-{q3:.2f} | {s['appliance_ttft_ms']:.1f} | {s['llama_server_ttft_ms']:.1f} | "
            f"{s['same_event_counts']} |"
        )
    lines += [
        "",
        "Both sides do the same work per request: HTTP, JSON, tokenization, llama.cpp decode, SSE. The appliance also",
        "writes its SQLite row and checks the power state; llama_cpp.server runs on uvicorn (asyncio), the appliance on",
        "waitress (threads). Ratio above 1: the appliance decodes faster. At 0.97 of the peer's speed or better in",
        f"the middle half of the rounds: {verdict_text(runs)}.",
        "",
        f"Reproduce: `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def figure(data: dict) -> str:
    runs = data["runs"]
    ratios = " / ".join(f"{r['summary']['decode_ratio']:.3f}x" for r in runs)
    threads = " / ".join(str(r["threads"]) for r in runs)
    return f"decode {ratios} llama_cpp.server's at {threads} threads ({verdict_text(runs)})"


def write_report(meta: dict, runs: list[dict], model: Path) -> Path:
    data = {"meta": meta, "runs": runs}
    run = record("peer_server", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(data),
                 command=meta["command"], report=markdown(data), data=data, inputs=[model])
    return run / "report.md"


def verdict_text(runs: list[dict]) -> str:
    """Whether the middle half of the rounds puts the appliance at least at 0.97 of the peer, per thread count."""
    return ", ".join(f"{r['threads']} thread{'s' * (r['threads'] > 1)} {verdict(r['summary']['decode_ratio_quartiles'], 0.97)}"
                     for r in runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    args = parser.parse_args(argv)
    entry = find_model(args.model)
    load_average = os.getloadavg()
    prompts = build_prompts(entry.path, args.rounds + 1)  # chat-formatted, one new prompt a round
    runs = [bench_threads(entry.path, prompts, t, args.max_tokens) for t in args.threads]
    meta = {"model": entry.name, "rounds": args.rounds, "max_tokens": args.max_tokens, "load_average": load_average,
            "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line("peer_server", argv)}
    print("report:", write_report(meta, runs, entry.path))


if __name__ == "__main__":
    main()
