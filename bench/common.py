"""What the benchmarks share: a real service to measure, and a description of the machine."""

from __future__ import annotations

import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List twenty animals and one fact about each.",
    "Describe the water cycle in detail.",
]


def start_service(threads: int, extra_env: dict | None = None, args: tuple[str, ...] | list[str] = (),
                  log: Path | None = None) -> tuple[subprocess.Popen, int]:
    """``appliance serve ARGS`` on a free loopback port, once it is ready; with a data folder of its own
    unless extra_env names one (APPLIANCE_HOME)."""
    env = dict(extra_env or {})
    env.setdefault("APPLIANCE_HOME", tempfile.mkdtemp(prefix="bench-home-"))
    return start_server(lambda port: ["-m", "appliance", "serve", "--port", str(port), "--threads", str(threads), *args],
                        ready_path="/readyz", extra_env=env, log=log)


def start_server(args_for_port, ready_path: str, extra_env: dict | None = None, program: str = sys.executable,
                 log: Path | None = None) -> tuple[subprocess.Popen, int]:
    """``program ARGS`` (python by default) on a free loopback port, returned once GET ready_path answers 200
    (within 60 s). Its output goes to the file log, or nowhere."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([program, *args_for_port(port)], env=dict(os.environ, **(extra_env or {})),
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    if log:
        out.close()  # the child holds its own copy
    where = f" (its output: {log})" if log else ""
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(args_for_port(port))} exited with status {proc.returncode}{where}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", ready_path)
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{' '.join(args_for_port(port))} did not get ready in 60 s{where}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "llama_cpp_python": llama_version, "load_avg": os.getloadavg(),
            **({"gpus": gpus} if (gpus := gpu_names()) else {})}


def gpu_names() -> list[str]:
    """The NVIDIA GPUs nvidia-smi sees; none where it is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def stream_completion(port: int, body: dict, path: str = "/v1/completions") -> dict:
    """POST path (body has stream on): when it was sent, when each event with text came, the usage, the
    models its events named, and whether the stream ended with ``data: [DONE]``.

    Completions carry text in ``choices[0].text``, chats in ``choices[0].delta.content``. An error event
    in the stream raises, as a non-200 status does."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    stamps, usage, done, models = [], None, False, set()
    try:
        start = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for raw in response:
            line = raw.decode().strip()
            done = done or line == "data: [DONE]"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event after {len(stamps)} text events: {event['error']}")
            usage = event.get("usage") or usage
            models.add(event.get("model"))
            choice = event["choices"][0] if event.get("choices") else {}
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
    finally:
        conn.close()
    return {"start": start, "stamps": stamps, "usage": usage, "done": done, "models": sorted(models - {None})}


def side_by_side(prompts: list[str], first, second, label: str, describe) -> tuple[list[dict], list[dict]]:
    """first(prompt) then second(prompt) for every prompt, interleaved so drift hits both alike.

    Round 0 warms both sides up and is not counted. describe(a, b) is the line printed per round.
    """
    firsts, seconds = [], []
    for i, prompt in enumerate(prompts):
        a, b = first(prompt), second(prompt)
        print(f"{label} round {i}: {describe(a, b)}", flush=True)
        if i:
            firsts.append(a)
            seconds.append(b)
    return firsts, seconds


def decode_speeds(models: dict[str, tuple[str, Path]], threads: int, repeats: int) -> dict[str, dict]:
    """name -> median decode tok/s, peak RSS and every run, for (format, path) models measured in turn, each
    `repeats` times in a fresh process (distill.export_report's speed run), so drift on the box hits all alike."""
    from distill.export_report import measure_speed

    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, (fmt, path) in models.items():
            runs[name].append(measure_speed(fmt, path, threads))
    return {name: {"decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in measured),
                   "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in measured), "runs": measured}
            for name, measured in runs.items()}


def middle_half(values: list[float]) -> list[float]:
    """First and third quartile: the range the middle half of the rounds fell in."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return [q1, q3]


def verdict(quartiles: list[float], goal: float) -> str:
    """Met or missed only when the middle half of the rounds agrees; otherwise the spread decides nothing."""
    low, high = quartiles
    return "✅" if low >= goal else "❌" if high < goal else "(within noise)"

