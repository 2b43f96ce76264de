"""Low-power idle on the bundled model: memory shed in deep idle, wake latency, CPU used while idle.

    python -m bench.power --cycles 5 --idle-seconds 60

- RSS of the service process when active (after a few requests) and in deep
  idle (model unloaded), per cycle;
- wake latency: time to first token of the first request after deep idle
  minus that of a warm request with a prompt of the same length (both
  prompts new to the KV cache, so both pay a full prefill);
- CPU time (user + system) the service uses over ``--idle-seconds`` with no
  requests, as a share of one core.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.common import machine, start_service
from bench.results import command_line, record
from models import find_model

GOAL = "deep-idle RSS <= 15% of active, wake latency <= 1 s, idle CPU < 1% of one core (issues 6 and 13)"


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, data


def ttft_ms(port: int, prompt: str) -> float:
    """Time to the first generated text of a streamed chat completion."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = None
    for raw in response:
        line = raw.decode().strip()
        if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    conn.close()
    return (first - start) * 1000


def prompt(i: int) -> str:
    # Same length every time, different text so no run reuses a cached prefix.
    return f"Note {i:04d}: write a short poem about the sea and the wind."


def wake_cycles(port: int, pid: int, cycles: int) -> list[dict]:
    process = psutil.Process(pid)
    out = []
    for c in range(cycles):
        for k in range(3):  # warm up: model loaded, caches hot
            ttft_ms(port, prompt(1000 * c + k))
        warm = ttft_ms(port, prompt(1000 * c + 10))
        active = tree_memory(process)  # the service and its runner process
        call(port, "POST", "/api/power", {"state": "deep_idle"})
        time.sleep(0.5)
        deep = tree_memory(process)  # the runner has ended: the service alone
        active_rss, deep_rss = active["rss"], deep["rss"]
        cold = ttft_ms(port, prompt(1000 * c + 11))
        status = call(port, "GET", "/api/status")[1]
        out.append({"active_rss": active_rss, "deep_idle_rss": deep_rss, "active_uss": active["uss"], "deep_idle_uss": deep["uss"],
                    "runners_deep_idle": deep["processes"] - 1,
                    "warm_ttft_ms": warm, "wake_ttft_ms": cold,
                    "wake_latency_ms": cold - warm, "reload_ms": status["last_wake_ms"]})
        print(f"cycle {c}: RSS {active_rss / 2**20:.0f} -> {deep_rss / 2**20:.0f} MiB, "
              f"TTFT warm {warm:.0f} ms, after deep idle {cold:.0f} ms", flush=True)
    return out


def tree_memory(process: psutil.Process) -> dict:
    """RSS and USS summed over a process and its children (the service and its model runner)."""
    procs = [process, *process.children(recursive=True)]
    infos = [p.memory_full_info() for p in procs]
    return {"rss": sum(m.rss for m in infos), "uss": sum(m.uss for m in infos), "processes": len(procs)}


def idle_cpu(pid: int, seconds: float) -> dict:
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return {"seconds": seconds, "cpu_seconds": used, "share_of_one_core": used / seconds}


def import_floor() -> dict:
    """RSS and USS of a fresh interpreter that has imported what the service's HTTP process imports (no engine)."""
    code = ("import appliance.app, appliance.server, appliance.api.openai, psutil; "
            "m = psutil.Process().memory_full_info(); print(m.rss, m.uss)")
    rss, uss = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"rss": int(rss), "uss": int(uss)}


def report_data(meta: dict, cycles: list[dict], idle: dict, floor: dict) -> dict:
    """The run's data with its medians over the cycles."""
    med = statistics.median
    active = med(c["active_rss"] for c in cycles)
    deep = med(c["deep_idle_rss"] for c in cycles)
    wake = med(c["wake_latency_ms"] for c in cycles)
    active_uss, deep_uss = med(c["active_uss"] for c in cycles), med(c["deep_idle_uss"] for c in cycles)
    summary = {"active_rss_mib": active / 2**20, "deep_idle_rss_mib": deep / 2**20, "deep_over_active": deep / active,
               "active_uss_mib": active_uss / 2**20, "deep_idle_uss_mib": deep_uss / 2**20,
               "deep_over_active_uss": deep_uss / active_uss,
               "import_floor_rss_mib": floor["rss"] / 2**20, "import_floor_uss_mib": floor["uss"] / 2**20,
               "wake_latency_ms": wake, "warm_ttft_ms": med(c["warm_ttft_ms"] for c in cycles),
               "wake_ttft_ms": med(c["wake_ttft_ms"] for c in cycles), "reload_ms": med(c["reload_ms"] for c in cycles),
               "idle_cpu_share": idle["share_of_one_core"]}
    return {"meta": meta, "summary": summary, "cycles": cycles, "idle": idle, "import_floor": floor}


def markdown(data: dict) -> str:
    meta, summary, cycles, idle, floor = (data[k] for k in ("meta", "summary", "cycles", "idle", "import_floor"))
    active, wake = statistics.median(c["active_rss"] for c in cycles), summary["wake_latency_ms"]
    m = meta["machine"]
    ok = lambda good: "✅" if good else "❌"  # noqa: E731
    lines = [
        "# Low-power idle: memory, wake latency, idle CPU",
        "",
        f"Model `{meta['model']}`, {meta['threads']} threads, context {meta['context_length']}, {len(cycles)} cycles, "
        f"on {m['cpu']} ({m['logical_cpus']} logical CPUs), {meta['date']}. Medians over cycles.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| RSS active | {summary['active_rss_mib']:.0f} MiB | |",
        f"| RSS deep idle | {summary['deep_idle_rss_mib']:.0f} MiB ({summary['deep_over_active']:.0%} of active) | <= 15% {ok(summary['deep_over_active'] <= 0.15)} |",
        f"| USS active -> deep idle (memory only this process holds) | {summary['active_uss_mib']:.0f} -> {summary['deep_idle_uss_mib']:.0f} MiB ({summary['deep_over_active_uss']:.0%}) | |",
        f"| a fresh interpreter with the service's imports, no model | RSS {summary['import_floor_rss_mib']:.0f} MiB, USS {summary['import_floor_uss_mib']:.0f} MiB | |",
        f"| time to first token, warm | {summary['warm_ttft_ms']:.0f} ms | |",
        f"| time to first token, first request after deep idle | {summary['wake_ttft_ms']:.0f} ms | |",
        f"| wake latency (difference) | {wake:.0f} ms (model reload alone {summary['reload_ms']:.0f} ms) | <= 1000 ms {ok(wake <= 1000)} |",
        f"| service CPU over {idle['seconds']:.0f} s idle | {idle['cpu_seconds']:.3f} s = {idle['share_of_one_core']:.2%} of one core | < 1% {ok(idle['share_of_one_core'] < 0.01)} |",
        "",
        "Active RSS is the service plus its runner process (the model and its KV cache); deep idle ends the runner",
        "and keeps the HTTP process alone: the Python interpreter with Flask, waitress, pydantic, sqlite-utils",
        f"and psutil take {summary['import_floor_rss_mib']:.0f} MiB of RSS "
        f"({summary['import_floor_uss_mib']:.0f} MiB USS) in a fresh",
        f"interpreter before any model (row above), {floor['rss'] / active:.0%} of active RSS with this 135M model. The rest of",
        f"deep idle ({summary['deep_idle_uss_mib'] - summary['import_floor_uss_mib']:.0f} MiB of USS over that floor) is what the "
        "running service holds beyond a fresh interpreter",
        "(threads, the SQLite connection, the heap of the requests it served; not broken down here). Active RSS",
        "grows with the slots: each of the `parallel` slots (4 by default) holds a KV cache of the context's length.",
        *([
            "The import floor alone is over 15% of active here: the HTTP process itself would have to shrink.",
        ] if floor["rss"] / active > 0.15 else []),
        "",
        "Deep-idle RSS per cycle, MiB: " + ", ".join(f"{c['deep_idle_rss'] / 2**20:.1f}" for c in cycles)
        + f" (last minus first: {(cycles[-1]['deep_idle_rss'] - cycles[0]['deep_idle_rss']) / 2**20:+.1f} MiB over "
        f"{len(cycles) - 1} wake cycles).",
        "",
        f"Reproduce: `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def figure(data: dict) -> str:
    s = data["summary"]
    return (f"deep idle {s['deep_over_active']:.0%} of active RSS ({s['deep_idle_rss_mib']:.0f} of "
            f"{s['active_rss_mib']:.0f} MiB), wake {s['wake_latency_ms']:.0f} ms, idle CPU {s['idle_cpu_share']:.2%} "
            "of one core")


def write_report(meta: dict, cycles: list[dict], idle: dict, floor: dict, model: Path) -> Path:
    data = report_data(meta, cycles, idle, floor)
    run = record("power", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(data), command=meta["command"],
                 report=markdown(data), data=data, inputs=[model])
    return run / "report.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    # Long timers so nothing changes state on its own while we measure; the admin API forces deep idle.
    proc, port = start_service(args.threads, {"APPLIANCE_IDLE_AFTER": "3600", "APPLIANCE_DEEP_IDLE_AFTER": "7200",
                                              "APPLIANCE_POWER_PROFILE": "none"})
    try:
        cycles = wake_cycles(port, proc.pid, args.cycles)
        ttft_ms(port, prompt(9999))
        print(f"measuring CPU over {args.idle_seconds:.0f} s of idle...", flush=True)
        idle = idle_cpu(proc.pid, args.idle_seconds)
        floor = import_floor()
        info = call(port, "GET", "/readyz")[1]
    finally:
        proc.terminate()
        proc.wait(30)
    meta = {"model": info["model"]["id"], "threads": args.threads, "context_length": info["model"]["context_length"],
            "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line("power", argv)}
    print("report:", write_report(meta, cycles, idle, floor, find_model(meta["model"]).path))


if __name__ == "__main__":
    main()
