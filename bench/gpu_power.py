"""GPU memory through the power modes: the service on a CUDA build, read from nvidia-smi.

The card's used memory and the service's own (every compute process nvidia-smi lists that is the service or
one of its children, the runner) at each step: before the service starts, loaded (after a request), idle and
deep idle (each forced with POST /api/power), and after waking (the first request after deep idle, whose time
to first token is the wake latency, beside a warm request's).

    python -m bench.gpu_power --model /tmp/gpu/model.gguf --parallel 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import start_service, stream_completion
from bench.results import command_line, record

GOAL = "the service holds 0 MiB of GPU memory in deep idle, once its runner has ended (issue 27)"


def smi(*query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def memory(service: psutil.Process | None) -> dict:
    """The card's used MiB, and the MiB of the compute processes that are the service or its children."""
    ours = set()
    if service is not None and service.is_running():
        ours = {service.pid} | {c.pid for c in service.children(recursive=True)}
    apps = [(int(pid), int(mib)) for pid, _, mib in smi("--query-compute-apps=pid,process_name,used_memory")]
    return {"card_used_mib": int(smi("--query-gpu=memory.used")[0][0]),
            "service_mib": sum(mib for pid, mib in apps if pid in ours),
            "service_processes": sorted(pid for pid, _ in apps if pid in ours),
            "compute_apps": [{"pid": pid, "mib": mib} for pid, mib in apps]}


def post(port: int, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"POST {path}: HTTP {response.status}: {data[:300]!r}")
    return json.loads(data)


def ttft_ms(port: int, text: str) -> float:
    run = stream_completion(port, {"messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0,
                                   "stream": True}, "/v1/chat/completions")
    return (run["stamps"][0] - run["start"]) * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--label")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-power-"))
    steps = {"before the service": memory(None)}
    env = {"APPLIANCE_HOME": str(workdir / "home"), "APPLIANCE_IDLE_AFTER": "86400", "APPLIANCE_DEEP_IDLE_AFTER": "86400",
           "APPLIANCE_POWER_PROFILE": "none"}
    serve_args = ["--model", args.model, "--context-length", str(args.context), "--parallel", str(args.parallel)]
    proc, port = start_service(args.threads, env, serve_args, log=workdir / "appliance.log")
    service = psutil.Process(proc.pid)
    try:
        ttft_ms(port, "Say hello.")
        warm = ttft_ms(port, "Name three rivers of Europe, one line each.")
        steps["loaded (after requests)"] = memory(service)
        post(port, "/api/power", {"state": "idle"})
        time.sleep(1)
        steps["idle (forced)"] = memory(service)
        start = time.perf_counter()
        post(port, "/api/power", {"state": "deep_idle"})
        deep_s = time.perf_counter() - start
        for _ in range(40):  # the runner's exit may lag the answer by a moment
            steps["deep idle (forced)"] = memory(service)
            if steps["deep idle (forced)"]["service_mib"] == 0:
                break
            time.sleep(0.25)
        wake = ttft_ms(port, "Name three mountains of Asia, one line each.")
        steps["after waking (first request)"] = memory(service)
        again = ttft_ms(port, "Name three lakes of Africa, one line each.")
    finally:
        proc.terminate()
        proc.wait(30)
    gpu = smi("--query-gpu=name,memory.total,driver_version")[0]
    data = {"gpu": gpu, "steps": steps, "warm_ttft_ms": warm, "wake_ttft_ms": wake, "after_wake_ttft_ms": again,
            "deep_idle_request_s": deep_s, "parallel": args.parallel, "context": args.context, "threads": args.threads,
            "model": Path(args.model).name, "command": command_line("gpu_power", argv), "date": time.strftime("%Y-%m-%d")}
    deep = steps["deep idle (forced)"]["service_mib"]
    figure = (f"service {steps['loaded (after requests)']['service_mib']} MiB loaded, "
              f"{steps['idle (forced)']['service_mib']} idle, {deep} in deep idle "
              f"{'✅' if deep == 0 else '❌'}, {steps['after waking (first request)']['service_mib']} after waking; "
              f"wake TTFT {wake:.0f} ms (warm {warm:.0f} ms)")
    lines = [f"# GPU memory through the power modes ({gpu[0]}, driver {gpu[2]}, {data['date']})", "",
             f"The service on llama.cpp's CUDA build, model `{data['model']}`, {args.parallel} slots of {args.context} "
             f"tokens, {args.threads} threads; read from nvidia-smi at each step.", "",
             "| step | card used MiB | the service's MiB | its GPU processes |", "|---|---|---|---|"]
    lines += [f"| {name} | {m['card_used_mib']} | {m['service_mib']} | {', '.join(map(str, m['service_processes'])) or '-'} |"
              for name, m in steps.items()]
    lines += ["", f"Time to first token: warm {warm:.0f} ms; first request after deep idle (the wake) {wake:.0f} ms; "
              f"the next {again:.0f} ms. POST /api/power deep_idle answered in {deep_s * 1000:.0f} ms.", "",
              f"Goal: {GOAL}: {'met' if deep == 0 else 'missed'}.", "", f"Reproduce: `{data['command']}`"]
    run = record("gpu_power", about=__doc__.splitlines()[0], goal=GOAL, figure=figure, command=data["command"],
                 report="\n".join(lines) + "\n", data=data, inputs=[Path(args.model)], label=args.label)
    print("\n".join(lines))
    print("report:", run / "report.md")


if __name__ == "__main__":
    main()
