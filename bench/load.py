"""Many clients at once: the appliance against llama.cpp's llama-server and llama-cpp-python's server.

N clients stream greedy chat completions at the same time, each sending its requests one after the
other, for N = 1, 4, 8 and 16. The three servers serve the same GGUF file with the same threads, the
same slots and the same context per slot. They run side by side in one run, but only one of them
has clients at a time: each concurrency level goes to each server in turn, so drift on the machine
hits them alike. Every server gets the same prompts, new ones at every level (no prompt cache helps).

Per server and level: aggregate generated tokens/s (all completion tokens over the level's wall
time), the median per-stream decode tokens/s, time to first token p50 and p99, errors, and for the
appliance the lost log rows (requests sent that have no finished 200 row in its logs.db).

The clients are spread over --client-procs processes (threads within each), so the load generator's
own Python is not what limits a fast server; the server "canned" (bench/canned_server.py: canned tokens,
no model) shows that ceiling beside the real servers.

    bench/build_llama_server.sh            # once: llama-server from the installed llama-cpp-python's sdist
    pip install -e '.[bench]'              # llama-cpp-python's own server
    python -m bench.load --clients 1 4 8 16 --requests-per-client 2 --max-tokens 128
    python -m bench.load --quick           # smoke test: 1 and 2 clients, 1 request each, 16 tokens
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import math
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import PROMPTS, machine, start_server, start_service, stream_completion
from bench.results import command_line, record
from models import find_model

SERVERS = ("appliance", "llama-server", "llama-server-streams", "llama-cpp-python", "canned")
PEER = "llama-server"  # what the ratios are against
# The goals of issue 13: aggregate throughput against llama-server's (0.97 at one client, 1.0 above),
# time to first token p50 at most 1.2x llama-server's.
AGGREGATE_GOAL = {1: 0.97}
AGGREGATE_GOAL_ABOVE_ONE = 1.0
TTFT_GOAL = 1.2
GOAL = ("aggregate >= 0.97x llama-server's at 1 client and >= 1.0x at 4, 8 and 16, TTFT p50 <= 1.2x, "
        "no errors, no lost log rows (issue 13)")
# The goals of issue 27 (both servers on a GPU): single-stream decode at least 0.95x llama-server's, aggregate
# at least 1.0x at 32 and 64 streams; TTFT p50 and p99 are reported beside llama-server's, with no goal.
GPU_DECODE_GOAL = 0.95
GPU_AGGREGATE_GOAL = {32: 1.0, 64: 1.0}
GPU_GOAL = ("single-stream decode >= 0.95x llama-server's, aggregate >= 1.0x at 32 and 64 streams, no errors, "
            "no lost log rows (issue 27: both on a GPU)")
CANNED_WORKERS = 4


def default_llama_server() -> Path:
    """Where bench/build_llama_server.sh puts llama-server for the installed llama-cpp-python."""
    import llama_cpp

    cache = Path(os.environ.get("APPLIANCE_BENCH_CACHE") or Path.home() / ".cache" / "appliance-bench")
    return cache / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor/llama.cpp/build/bin/llama-server"


@dataclass
class Setup:
    """What every server is given alike."""

    model: Path
    threads: int
    parallel: int  # slots
    context: int  # tokens per slot
    llama_server: Path
    workdir: Path  # server logs, the appliance's data folder


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    command: str  # how to start it by hand (PORT for the port)
    body: dict = field(default_factory=dict)  # request fields this server needs to do the same work
    home: Path | None = None  # the appliance's data folder, for its log rows
    note: str = ""


def start_appliance(setup: Setup) -> Server:
    home = setup.workdir / "appliance-home"
    # No idle steps while other servers take their turn, and no power profile touching the shared box.
    env = {"APPLIANCE_HOME": str(home), "APPLIANCE_IDLE_AFTER": "86400", "APPLIANCE_DEEP_IDLE_AFTER": "86400",
           "APPLIANCE_POWER_PROFILE": "none"}
    args = ["--model", str(setup.model), "--context-length", str(setup.context), "--parallel", str(setup.parallel)]
    proc, port = start_service(setup.threads, env, args, log=setup.workdir / "appliance.log")
    command = " ".join([*(f"{k}={v}" for k, v in env.items() if k != "APPLIANCE_HOME"),
                        "python -m appliance serve --port PORT --threads", str(setup.threads), *args])
    return Server("appliance", proc, port, command, {"stream_options": {"include_usage": True}}, home)


def start_llama_server(setup: Setup, unified: bool = True) -> Server:
    if not setup.llama_server.is_file():
        raise SystemExit(f"no llama-server at {setup.llama_server}: run bench/build_llama_server.sh, or give --llama-server PATH")
    # One KV pool of slots x context, each slot capped at the context: the appliance's per-slot context. Or
    # (llama-server-streams) one KV stream of the context per slot, as the appliance's runner keeps them.
    kv = ["--kv-unified", "--kv-unified-per-slot", str(setup.context)] if unified else ["--no-kv-unified"]
    args = ["-m", str(setup.model), "-t", str(setup.threads), "-tb", str(setup.threads), "-np", str(setup.parallel),
            "-c", str(setup.parallel * setup.context), *kv, "--no-webui", "--host", "127.0.0.1"]
    name = PEER if unified else f"{PEER}-streams"
    proc, port = start_server(lambda port: [*args, "--port", str(port)], "/health", program=str(setup.llama_server),
                              log=setup.workdir / f"{name}.log")
    return Server(name, proc, port, " ".join([str(setup.llama_server), *args, "--port PORT"]),
                  {"stream_options": {"include_usage": True}})


def start_llama_cpp_python(setup: Setup) -> Server:
    # It has one context and serves one request at a time; by default a new request cuts the running stream short.
    args = ["-m", "llama_cpp.server", "--model", str(setup.model), "--n_threads", str(setup.threads),
            "--n_threads_batch", str(setup.threads), "--n_ctx", str(setup.context), "--interrupt_requests", "False",
            "--host", "127.0.0.1"]
    proc, port = start_server(lambda port: [*args, "--port", str(port)], "/v1/models",
                              log=setup.workdir / "llama-cpp-python.log")
    return Server("llama-cpp-python", proc, port, " ".join(["python", *args, "--port PORT"]),
                  {"repeat_penalty": 1.0},  # its default is 1.1; the others have none
                  note="one request at a time, no slots; its streams carry no usage, so tokens are its content deltas")


def start_canned(setup: Setup) -> Server:
    args = ["-m", "bench.canned_server", "--workers", str(CANNED_WORKERS)]
    proc, port = start_server(lambda port: [*args, "--port", str(port)], "/health", log=setup.workdir / "canned.log")
    return Server("canned", proc, port, " ".join(["python", *args, "--port PORT"]),
                  note="no model: canned tokens as fast as it can send them, the load generator's ceiling")


STARTERS = {"appliance": start_appliance, "llama-server": start_llama_server,
            "llama-server-streams": lambda setup: start_llama_server(setup, unified=False),
            "llama-cpp-python": start_llama_cpp_python, "canned": start_canned}


def prompt(clients: int, index: int) -> str:
    """The same text for every server; new at every level, so no server answers from its prompt cache."""
    return f"(level {clients}, request {index}) {PROMPTS[index % len(PROMPTS)]}"


def one_request(server: Server, text: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, **server.body}
    start = time.perf_counter()
    try:
        run = stream_completion(server.port, body, "/v1/chat/completions")
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
        return {"start": start, "end": time.perf_counter(), "error": str(exc)[:300]}
    end = time.perf_counter()
    stamps = run["stamps"]
    if not run["done"] or not stamps:
        return {"start": start, "end": end, "error": "stream ended without [DONE]" if not run["done"] else "no text"}
    usage = run["usage"] or {}
    tokens = usage.get("completion_tokens") or len(stamps)
    span = stamps[-1] - stamps[0]
    return {"start": run["start"], "end": end, "tokens": tokens, "token_source": "usage" if usage else "deltas",
            "ttft_ms": (stamps[0] - run["start"]) * 1000, "decode_tps": (tokens - 1) / span if span > 0 else None}


def run_level(server: Server, clients: int, requests_per_client: int, max_tokens: int, procs: int = 1) -> list[dict]:
    """clients at once, each sending its requests one after the other: threads spread over procs processes
    (forked, so they share nothing but the start), all starting together. perf_counter is the system's
    monotonic clock, so the processes' times compare."""
    if procs <= 1:
        return client_group(server, list(range(clients)), clients, requests_per_client, max_tokens)
    ctx = multiprocessing.get_context("fork")
    groups = [list(range(clients))[i::procs] for i in range(min(procs, clients))]
    start = ctx.Barrier(len(groups))
    results = ctx.Queue()
    workers = [ctx.Process(target=_group_process, args=(server, ids, clients, requests_per_client, max_tokens, start,
                                                        results)) for ids in groups]
    for w in workers:
        w.start()
    out = [r for _ in workers for r in results.get(timeout=900)]
    for w in workers:
        w.join()
    return out


def _group_process(server, ids, clients, requests_per_client, max_tokens, start, results) -> None:
    results.put(client_group(server, ids, clients, requests_per_client, max_tokens, start.wait))


def client_group(server: Server, ids: list[int], clients: int, requests_per_client: int, max_tokens: int,
                 ready=None) -> list[dict]:
    """The clients ids, one thread each; ready() (the other processes' barrier) runs once all are started."""
    barrier = threading.Barrier(len(ids), action=ready)

    def client(c: int) -> list[dict]:
        barrier.wait()
        return [one_request(server, prompt(clients, c * requests_per_client + r), max_tokens)
                for r in range(requests_per_client)]

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        return [r for results in pool.map(client, ids) for r in results]


def percentile(values: list[float], q: float) -> float | None:
    """Linear between the nearest ranks (numpy's default): q=50 is the median, q=100 the largest."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summarize(requests: list[dict]) -> dict:
    ok = [r for r in requests if "error" not in r]
    wall = max(r["end"] for r in requests) - min(r["start"] for r in requests)
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft_ms"] for r in ok]
    speeds = [r["decode_tps"] for r in ok if r["decode_tps"]]
    return {"requests": len(requests), "errors": len(requests) - len(ok), "completion_tokens": tokens,
            "wall_s": wall, "aggregate_tps": tokens / wall if wall > 0 else None,
            "per_stream_tps_median": statistics.median(speeds) if speeds else None,
            "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99)}


def last_row_id(home: Path) -> int:
    rows = read_rows(home, 1)
    return rows[0]["id"] if rows else 0


def read_rows(home: Path, limit: int) -> list[dict]:
    from appliance.db import Database

    db = Database(home / "logs.db", readonly=True)
    try:
        return db.recent_requests(limit)
    finally:
        db.close()


def lost_rows(rows: list[dict], sent: int) -> dict:
    """Of sent requests: rows missing, rows never finished, finished rows without status 200."""
    missing = max(0, sent - len(rows))
    unfinished = sum(1 for r in rows if r["finished"] is None)
    not_ok = sum(1 for r in rows if r["finished"] is not None and r["status"] != 200)
    return {"rows": len(rows), "missing": missing, "unfinished": unfinished, "non_200": not_ok,
            "lost": missing + unfinished + not_ok, "logged_completion_tokens": sum(r["completion_tokens"] or 0 for r in rows)}


def level_rows(home: Path, after_id: int, sent: int, wait_s: float = 10.0) -> list[dict]:
    """The level's rows, once all are finished (a row is completed just after its stream ends) or wait_s has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = [r for r in read_rows(home, sent + 50) if r["id"] > after_id]
        if (len(rows) >= sent and all(r["finished"] for r in rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def wait_until_quiet(busy_percent: float = 15.0, longest: float = 15.0) -> float:
    """Wait (up to ``longest`` s) until the machine's CPU is nearly idle; returns the seconds waited.

    A server that was just started or just served a level may still be busy for a moment (llama-server
    saves its slots' prompts into its RAM cache); the next level must not pay for that."""
    start = time.monotonic()
    while psutil.cpu_percent(interval=0.5) > busy_percent and time.monotonic() - start < longest:
        pass
    return time.monotonic() - start


def bench_level(server: Server, clients: int, requests_per_client: int, max_tokens: int, procs: int = 1) -> dict:
    waited = wait_until_quiet()
    before = last_row_id(server.home) if server.home else None
    requests = run_level(server, clients, requests_per_client, max_tokens, procs)
    level = {"server": server.name, "clients": clients, "summary": summarize(requests), "requests": requests,
             "waited_for_quiet_s": waited}
    if server.home:
        level["log_rows"] = lost_rows(level_rows(server.home, before, len(requests)), len(requests))
    return level


def describe(level: dict) -> str:
    s = level["summary"]
    text = (f"{level['clients']:>2} clients  {level['server']:<16} {fmt(s['aggregate_tps'])} tok/s aggregate, "
            f"{fmt(s['per_stream_tps_median'])} tok/s per stream, TTFT p50 {fmt(s['ttft_p50_ms'], 0)} ms "
            f"p99 {fmt(s['ttft_p99_ms'], 0)} ms, {s['errors']} errors")
    if "log_rows" in level:
        text += f", {level['log_rows']['lost']} lost log rows"
    return text


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(level: dict, peer: dict | None, key: str) -> float | None:
    if not peer or level["summary"][key] is None or not peer["summary"][key]:
        return None
    return level["summary"][key] / peer["summary"][key]


def with_ratios(levels: list[dict], servers_per_round: int) -> list[dict]:
    """Each level with its aggregate and TTFT p50 against llama-server's run right beside it (the same round:
    a level repeated in --clients has the same prompts, which a repeat may find in a server's prompt cache)."""
    out = []
    for start in range(0, len(levels), servers_per_round):
        round_ = levels[start:start + servers_per_round]
        peer = next((lv for lv in round_ if lv["server"] == PEER), None)
        out += [lv | {"aggregate_ratio": ratio(lv, peer, "aggregate_tps"),
                      "per_stream_ratio": ratio(lv, peer, "per_stream_tps_median"),
                      "ttft_p50_ratio": ratio(lv, peer, "ttft_p50_ms")} for lv in round_]
    return out


def goals(level: dict, gpu: bool = False) -> str:
    """Issue 13's goals (issue 27's with gpu) for one appliance level: ✅ or ❌ per goal, '-' where llama-server
    was not measured."""
    if gpu:
        marks = [("single-stream decode >= 0.95x", level.get("per_stream_ratio"), lambda r: r >= GPU_DECODE_GOAL)
                 ] if level["clients"] == 1 else []
        if level["clients"] in GPU_AGGREGATE_GOAL:
            marks.append((f"aggregate >= {GPU_AGGREGATE_GOAL[level['clients']]}x", level["aggregate_ratio"],
                          lambda r: r >= GPU_AGGREGATE_GOAL[level["clients"]]))
    else:
        aggregate_goal = AGGREGATE_GOAL.get(level["clients"], AGGREGATE_GOAL_ABOVE_ONE)
        marks = [("aggregate", level["aggregate_ratio"], lambda r: r >= aggregate_goal),
                 ("TTFT", level["ttft_p50_ratio"], lambda r: r <= TTFT_GOAL)]
    out = [f"{name} {'-' if value is None else '✅' if ok(value) else '❌'}" for name, value, ok in marks]
    clean = level["summary"]["errors"] == 0 and level.get("log_rows", {}).get("lost", 0) == 0
    return ", ".join(out + [f"no errors or lost rows {'✅' if clean else '❌'}"])


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    m = meta["machine"]
    lines = [
        "# Concurrent streaming clients: the appliance, llama-server and llama-cpp-python's server",
        "",
        f"Model `{meta['model']}`; {meta['threads']} threads, {meta['parallel']} slots of {meta['context']} tokens for every "
        f"server; each client streams {meta['requests_per_client']} greedy chat completion(s) of up to {meta['max_tokens']} "
        f"tokens one after the other. {m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical CPUs), "
        f"Python {m['python']}, llama-cpp-python {m['llama_cpp_python']}, llama-server {meta['llama_server_version']}; "
        f"{meta['date']}; load average {meta['load_average'][0]:.1f} at the start, {meta['load_average_end'][0]:.1f} at the end.",
        "",
        "| clients | server | aggregate tok/s | x llama-server | per-stream tok/s (median) | x llama-server | TTFT p50 ms | x llama-server | TTFT p99 ms | errors | lost log rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in runs:
        s = lv["summary"]
        lost = str(lv["log_rows"]["lost"]) if "log_rows" in lv else "-"
        lines.append(f"| {lv['clients']} | {lv['server']} | {fmt(s['aggregate_tps'])} | {fmt(lv['aggregate_ratio'], 2)} | "
                     f"{fmt(s['per_stream_tps_median'])} | {fmt(lv.get('per_stream_ratio'), 2)} | "
                     f"{fmt(s['ttft_p50_ms'], 0)} | {fmt(lv['ttft_p50_ratio'], 2)} | "
                     f"{fmt(s['ttft_p99_ms'], 0)} | {s['errors']} | {lost} |")
    gpu = meta.get("goals") == "27"
    lines += ["", f"Goals of the appliance ({GPU_GOAL if gpu else GOAL}):", ""]
    lines += [f"- {lv['clients']} clients: {goals(lv, gpu)}" for lv in runs if lv["server"] == "appliance"]
    lines += [
        "",
        "Aggregate tok/s is every completion token of the level over its wall time (first request sent to last stream",
        "ended); per-stream tok/s counts from a stream's first text event to its last; TTFT is from sending a request",
        "to its first text event, so it includes the wait for a slot. Completion tokens are the server's own",
        "`usage.completion_tokens` where its stream reports it. Lost log rows: requests sent that have no finished",
        "row with status 200 in the appliance's logs.db. The clients are Python threads spread over "
        f"{meta.get('client_procs', 1)} process(es), on the same CPU as the servers; the server `canned`, where it ran, "
        "streams canned tokens with no model: its row is the load generator's ceiling.",
        "Each level starts once the machine's CPU is below 15% (at most 15 s): a server just started or just done",
        "may still be busy for a moment. One run, no repeats: read small differences as noise.",
        "",
        "Servers, as started (each level goes to each server in turn; the others sit idle meanwhile):",
        "",
    ]
    lines += [f"- {name}: `{s['command']}`" + (f" ({s['note']})" if s["note"] else "") for name, s in meta["servers"].items()]
    lines += ["", f"Reproduce: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def figure(data: dict) -> str:
    """The appliance's ratios to llama-server per level, its errors and lost rows."""
    ours = [lv for lv in data["runs"] if lv["server"] == "appliance"]
    if not ours:
        return "the appliance was not measured"
    ttft = [lv["ttft_p50_ratio"] for lv in ours if lv["ttft_p50_ratio"] is not None]
    errors = sum(lv["summary"]["errors"] for lv in ours)
    lost = sum(lv.get("log_rows", {}).get("lost", 0) for lv in ours)
    single = next((lv for lv in ours if lv["clients"] == 1 and lv.get("per_stream_ratio") is not None), None)
    return ((f"single-stream decode {single['per_stream_ratio']:.2f}x, " if single else "") + f"aggregate {' / '.join(fmt(lv['aggregate_ratio'], 2) + 'x' for lv in ours)} llama-server's at "
            f"{' / '.join(str(lv['clients']) for lv in ours)} clients, TTFT p50 "
            f"{f'{min(ttft):.2f}-{max(ttft):.2f}x' if ttft else '-'}; {errors} errors, {lost} lost rows")


def write_report(meta: dict, runs: list[dict], inputs: list[Path], label: str | None = None,
                 files: dict | None = None) -> Path:
    data = {"meta": meta, "runs": runs}
    goal = GPU_GOAL if meta.get("goals") == "27" else GOAL
    run = record("load", about=__doc__.splitlines()[0], goal=goal, figure=figure(data), command=meta["command"],
                 report=markdown(data), data=data, inputs=inputs, label=label, files=files)
    return run / "report.md"


def llama_server_version(path: Path) -> str | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in (out.stdout + out.stderr).splitlines()
                 if line.startswith("version:")), None)


def stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def parse_args(argv):
    from appliance.config import default_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrency levels (default 1 4 8 16)")
    parser.add_argument("--requests-per-client", type=int, help="requests each client sends in turn (default 2)")
    parser.add_argument("--max-tokens", type=int, help="completion tokens per request (default 128)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="inference threads (default: physical cores)")
    parser.add_argument("--parallel", type=int, default=8, help="slots (default 8)")
    parser.add_argument("--context", type=int, default=4096, help="context tokens per slot (default 4096)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS[:3]))
    parser.add_argument("--client-procs", type=int, default=8,
                        help="client processes the clients are spread over (default 8; 1: threads of this process)")
    parser.add_argument("--goals", choices=("13", "27"), default="13",
                        help="whose goals the report checks: issue 13's (CPU) or issue 27's (both on a GPU)")
    parser.add_argument("--attach", nargs="*", type=Path, default=[],
                        help="files kept in the run folder beside the report (say, llama-batched-bench's output)")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary (default: bench/build_llama_server.sh's)")
    parser.add_argument("--label", help="the run's id in bench/results/load/runs/<date>-<id> (default: the commit; "
                                        "quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 and 2 clients, 1 request each, 16 tokens")
    args = parser.parse_args(argv)
    quick = {"clients": [1, 2], "requests_per_client": 1, "max_tokens": 16}
    full = {"clients": [1, 4, 8, 16], "requests_per_client": 2, "max_tokens": 128}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.llama_server = args.llama_server or default_llama_server()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup = Setup(find_model(args.model).path, args.threads, args.parallel, args.context, args.llama_server,
                  Path(tempfile.mkdtemp(prefix="bench-load-")))
    print(f"server logs and the appliance's data folder: {setup.workdir}", flush=True)
    load_average = os.getloadavg()
    servers: list[Server] = []
    try:
        for name in args.servers:
            servers.append(STARTERS[name](setup))
            warm_up = one_request(servers[-1], "Say hello.", 8)  # not counted
            if "error" in warm_up:
                print(f"{name}: the warm-up request failed: {warm_up['error']}", flush=True)
        runs = []
        for clients in args.clients:
            for server in servers:
                runs.append(bench_level(server, clients, args.requests_per_client, args.max_tokens, args.client_procs))
                print(describe(runs[-1]), flush=True)
    finally:
        for server in servers:
            stop(server)
    runs = with_ratios(runs, len(servers))
    for lv in runs:
        if lv["server"] != PEER and lv["aggregate_ratio"] is not None:
            print(f"{lv['clients']:>2} clients  {lv['server']:<16} {lv['aggregate_ratio']:.2f}x llama-server's aggregate, "
                  f"TTFT p50 {fmt(lv['ttft_p50_ratio'], 2)}x")
    meta = {"model": setup.model.name, "threads": args.threads, "parallel": args.parallel, "context": args.context,
            "clients": args.clients, "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
            "client_procs": args.client_procs, "goals": args.goals,
            "machine": machine() | {"physical_cores": psutil.cpu_count(logical=False)},
            "llama_server_version": llama_server_version(setup.llama_server) if PEER in args.servers else None,
            "servers": {s.name: {"command": s.command, "note": s.note} for s in servers},
            "load_average": load_average, "load_average_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line("load", argv)}
    inputs = [setup.model] + ([setup.llama_server] if PEER in args.servers else [])
    attached = {f.name: f for f in args.attach if f.is_file()}
    print("report:", write_report(meta, runs, inputs, args.label or ("quick" if args.quick else None), attached))


if __name__ == "__main__":
    main()
