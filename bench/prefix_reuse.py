"""Prefix reuse: how soon a chat's next turn reaches its first token, against a cold request of the same length.

A conversation of about 2,000 tokens is sent (cold: nothing of it is cached), then its next turn,
which re-sends the whole conversation plus the answer and a new question. The second turn should
only compute the new part. Each round uses a conversation of its own; the same rounds go to the
appliance and to llama.cpp's llama-server (its slots cache prompts too), side by side.

    python -m bench.prefix_reuse --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, stream_completion
from bench.load import STARTERS, Setup, default_llama_server, stop
from bench.results import command_line, record
from models import find_model

GOAL = 5.0  # issue 13: the second turn reaches its first token at least 5x sooner than a cold request

TOPICS = ["the sea", "mountains", "rivers", "deserts", "forests", "cities", "islands", "glaciers", "volcanoes", "lakes"]


def conversation(round_: int, sentences: int) -> str:
    """A long first message of its own per round: numbered sentences, so no two rounds share a prefix."""
    topic = TOPICS[round_ % len(TOPICS)]
    lines = [f"Round {round_}. Here are my notes about {topic}, please read them all."]
    lines += [f"Note {i} of round {round_}: {topic} change with the seasons, and sample {i * 7 + round_} "
              f"was taken near marker {i * 13 % 97}." for i in range(sentences)]
    return " ".join(lines)


def ttft_ms(port: int, messages: list[dict], extra: dict) -> tuple[float, dict]:
    body = {"messages": messages, "max_tokens": 16, "temperature": 0, "stream": True} | extra
    out = stream_completion(port, body, path="/v1/chat/completions")
    return (out["stamps"][0] - out["start"]) * 1000, out


def one_round(server, round_: int, sentences: int) -> dict:
    first = [{"role": "user", "content": conversation(round_, sentences)}]
    cold, out = ttft_ms(server.port, first, server.body)
    # The answer as the server gave it is not needed verbatim: any assistant turn keeps the prefix.
    second = first + [{"role": "assistant", "content": "I have read your notes."},
                      {"role": "user", "content": "Which note mentions marker 42?"}]
    warm, out2 = ttft_ms(server.port, second, server.body)
    usage = out2.get("usage") or {}
    return {"cold_ttft_ms": cold, "next_turn_ttft_ms": warm, "speedup": cold / warm,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def main(argv=None) -> None:
    from appliance.config import default_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=70, help="notes in the first message (70: ~2,000 tokens)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--servers", nargs="+", default=["appliance", "llama-server"], choices=["appliance", "llama-server"])
    parser.add_argument("--llama-server", type=Path, default=None)
    args = parser.parse_args(argv)
    setup = Setup(find_model("smollm2-135m-instruct").path, args.threads, args.parallel, 4096,
                  args.llama_server or default_llama_server(), Path(tempfile.mkdtemp(prefix="bench-prefix-")))
    servers = [STARTERS[name](setup) for name in args.servers]
    results: dict[str, list[dict]] = {s.name: [] for s in servers}
    try:
        for round_ in range(args.rounds):
            for server in servers:
                results[server.name].append(one_round(server, round_, args.sentences))
                r = results[server.name][-1]
                print(f"round {round_} {server.name:<12} cold {r['cold_ttft_ms']:.0f} ms, next turn "
                      f"{r['next_turn_ttft_ms']:.0f} ms ({r['speedup']:.1f}x), prompt {r['prompt_tokens']} tokens, "
                      f"cached {r['cached_tokens']}", flush=True)
    finally:
        for server in servers:
            stop(server)
    summary = {name: {"cold_ttft_ms_median": statistics.median(r["cold_ttft_ms"] for r in rows),
                      "next_turn_ttft_ms_median": statistics.median(r["next_turn_ttft_ms"] for r in rows),
                      "speedup_median": statistics.median(r["speedup"] for r in rows),
                      "prompt_tokens": rows[0]["prompt_tokens"]} for name, rows in results.items()}
    command = command_line("prefix_reuse", argv)
    lines = ["# Prefix reuse: a chat's next turn against a cold request", "",
             f"`{command}` on "
             f"{machine()['cpu']}, {args.threads} threads, {args.parallel} slots, {time.strftime('%Y-%m-%d')}. "
             f"{args.rounds} rounds, each a conversation of its own; medians.", "",
             "| server | prompt tokens (2nd turn) | cold TTFT | next-turn TTFT | speed-up | goal >= 5x |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        ok = "met" if s["speedup_median"] >= GOAL else "missed"
        lines.append(f"| {name} | {s['prompt_tokens']} | {s['cold_ttft_ms_median']:.0f} ms | "
                     f"{s['next_turn_ttft_ms_median']:.0f} ms | {s['speedup_median']:.1f}x | {ok if name == 'appliance' else ''} |")
    data = {"args": vars(args) | {"llama_server": str(setup.llama_server)}, "summary": summary, "rounds": results}
    run = record("prefix_reuse", about=__doc__.splitlines()[0],
                 goal="the next turn of a 2,000-token chat reaches its first token >= 5x sooner than cold (issue 13)",
                 figure=figure(data), command=command, report="\n".join(lines) + "\n", data=data,
                 inputs=[setup.model] + ([setup.llama_server] if "llama-server" in args.servers else []))
    print("report:", run / "report.md")


def figure(data: dict) -> str:
    speedups = [f"{name} {s['speedup_median']:.1f}x" for name, s in data["summary"].items()]
    return f"next turn sooner than cold, median: {', '.join(speedups)}"


if __name__ == "__main__":
    main()
