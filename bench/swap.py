"""Swap under load: streaming clients keep asking for one alias while it is swapped to another package.

The service serves the bundled SmolLM2 and a second package (the same GGUF under another name, so
both answer alike); each model gets one thread of its own, as README's "Several models" advises for
a CPU box. Clients stream chats to the alias ``smollm2`` for a window with no swap, then for a
window of the same length in which the alias is swapped to the second package. Reported, from one
run: the swap's load, warm-up and switch times (as the service measured them), failed requests,
and the worst and median time to first token with and without the swap.

    python -m bench.swap --clients 4 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import machine, start_service, stream_completion
from bench.results import command_line, record
from models import find_model
from models.manifest import write_manifest
from models.registry import add_package

MODEL, SECOND = "smollm2-135m-instruct", "smollm2-copy"
GOAL = 1.5  # issue 21: the worst TTFT during a swap within 1.5x of the TTFT with no swap, and no request failed


def second_package(folder: Path) -> Path:
    """The bundled GGUF again, as a registered package of another name (hard-linked where the disk allows)."""
    folder.mkdir(parents=True)
    source = find_model(MODEL).path
    try:
        os.link(source, folder / source.name)
    except OSError:
        shutil.copy(source, folder / source.name)
    write_manifest(folder, name=SECOND, architecture="llama", format="gguf", quantization="Q4_1", target="cpu",
                   context_length=2048)
    return folder


class Clients:
    """``count`` threads streaming chats to ``model`` until stopped; each request's start, TTFT and model."""

    def __init__(self, port: int, count: int, model: str, max_tokens: int):
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(count)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self, client: int) -> None:
        n = 0
        while not self._stop.is_set():
            body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Client {client}, question {n}: name a colour."}]}
            n += 1
            start = time.monotonic()
            try:
                out = stream_completion(self.port, body, path="/v1/chat/completions")
                self.results.append({"start": start, "ttft_ms": (out["stamps"][0] - out["start"]) * 1000,
                                     "models": out["models"], "ok": True})
            except Exception as exc:  # noqa: BLE001 - a failed request is what this benchmark counts
                self.results.append({"start": start, "ok": False, "error": repr(exc)})


def window(port: int, clients: int, seconds: float, max_tokens: int, swap_at: float | None) -> dict:
    swap: dict = {}
    with Clients(port, clients, "smollm2", max_tokens) as running:
        begin = time.monotonic()
        if swap_at is not None:
            time.sleep(swap_at)
            swap["asked"] = time.monotonic()
            r = requests.post(f"http://127.0.0.1:{port}/api/models/smollm2/swap", json={"package": SECOND}, timeout=300)
            swap["done"] = time.monotonic()
            swap["status"] = r.status_code
            swap["answer"] = r.json().get("swap") if r.ok else r.json()
        time.sleep(max(0.0, begin + seconds - time.monotonic()))
    return {"requests": running.results, "swap": swap, "begin": begin}


def ttft_figures(rows: list[dict]) -> dict:
    times = sorted(r["ttft_ms"] for r in rows if r["ok"])
    return {"requests": len(rows), "failed": sum(not r["ok"] for r in rows),
            "ttft_ms_median": statistics.median(times) if times else None, "ttft_ms_worst": times[-1] if times else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each window (default 20)")
    parser.add_argument("--swap-at", type=float, default=5.0, help="seconds into the second window (default 5)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    home = work / "home"
    add_package(second_package(work / "packages" / SECOND), home=home)
    one_thread = json.dumps({MODEL: {"threads": 1}, SECOND: {"threads": 1}})
    proc, port = start_service(1, {"APPLIANCE_HOME": str(home), "APPLIANCE_MODEL_SETTINGS": one_thread,
                                   "APPLIANCE_PARALLEL": str(args.clients)}, log=work / "serve.log")
    try:
        window(port, args.clients, 3, args.max_tokens, None)  # warm-up: nothing measured
        calm = window(port, args.clients, args.seconds, args.max_tokens, None)
        swapped = window(port, args.clients, args.seconds, args.max_tokens, args.swap_at)
    finally:
        proc.terminate()
        proc.wait(30)
    data = summarize(args, calm, swapped)
    command = command_line("swap", argv)
    run = record("swap", about=__doc__.splitlines()[0],
                 goal="no request fails, and the worst TTFT during a swap is within 1.5x of the worst with no swap "
                      "(issue 21)", figure=figure(data), command=command, report=report(data, command), data=data,
                 inputs=[find_model(MODEL).path])
    print(report(data, command))
    print("report:", run / "report.md")


def summarize(args, calm: dict, swapped: dict) -> dict:
    swap = swapped["swap"]
    # During the swap: requests that started between the swap's request and its answer (the new model loading and
    # warming up beside the old one), and those of the next seconds, while the old one finishes and stops.
    during = [r for r in swapped["requests"] if swap.get("asked", 0) - 0.5 <= r["start"] <= swap.get("done", 0) + 3]
    mixed = [r for r in swapped["requests"] if r["ok"] and len(r["models"]) != 1]
    return {"args": vars(args), "machine": machine(), "swap": {"status": swap.get("status"),
            "service_ms": swap.get("answer"), "wall_ms": round((swap["done"] - swap["asked"]) * 1000, 1)},
            "no_swap": ttft_figures(calm["requests"]), "during_swap": ttft_figures(during),
            "whole_swap_window": ttft_figures(swapped["requests"]), "answers_mixing_models": len(mixed),
            "models_seen": sorted({m for r in swapped["requests"] if r["ok"] for m in r["models"]})}


def figure(data: dict) -> str:
    calm, during = data["no_swap"], data["during_swap"]
    ratio = during["ttft_ms_worst"] / calm["ttft_ms_worst"] if calm["ttft_ms_worst"] and during["ttft_ms_worst"] else 0
    ok = during["failed"] == 0 and data["whole_swap_window"]["failed"] == 0 and ratio <= GOAL
    return (f"{'✅' if ok else '❌'} worst TTFT during the swap {ratio:.2f}x of the worst with none; "
            f"{data['whole_swap_window']['failed']} failed; swap {data['swap']['wall_ms']:.0f} ms")


def report(data: dict, command: str) -> str:
    a, s = data["args"], data["swap"]
    service = s["service_ms"] or {}
    lines = [
        "# Swap under load", "",
        f"`{command}`: {a['clients']} streaming clients ({a['max_tokens']} tokens each, greedy) on the alias "
        f"`smollm2`, a {a['seconds']:.0f} s window without a swap and one with the swap at {a['swap_at']:.0f} s; "
        f"each model 1 thread; {data['machine']['cpu']}, {time.strftime('%Y-%m-%d')}.", "",
        f"- swap answered {s['status']} after {s['wall_ms']:.0f} ms: load {service.get('load_ms', '-')} ms, warm-up "
        f"probe {service.get('warm_up_ms', '-')} ms, switch {service.get('switch_ms', '-')} ms",
        f"- answers that mixed two models: {data['answers_mixing_models']}; models seen: {', '.join(data['models_seen'])}",
        "", "| window | requests | failed | TTFT median | TTFT worst |", "|---|---|---|---|---|"]
    for name, key in (("no swap", "no_swap"), ("during the swap", "during_swap"), ("whole swap window", "whole_swap_window")):
        f = data[key]
        lines.append(f"| {name} | {f['requests']} | {f['failed']} | {f['ttft_ms_median'] or 0:.0f} ms | "
                     f"{f['ttft_ms_worst'] or 0:.0f} ms |")
    lines += ["", f"Goal: {figure(data)} (worst during the swap within {GOAL}x of the worst with no swap)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
