"""A Locust load test of the box: streaming chat users with keys, priority classes, short and long prompts.

A fresh service with default settings and the bundled model (its own data folder, a few user keys and an admin
key made there first, so keys are required), then ``locust -f bench/locustfile.py --headless`` against it at each
user count in turn. Per level: chats served to ``[DONE]``, rejected with 429 (each user waits its Retry-After
before its next chat), errors, time to first token p50 and p99, completion tokens/s, ``/healthz`` latency (from
Locust and from a separate prober), the queue the service reported in ``/api/status``, and the log rows left
unfinished once the level is over.

Locust lives in a venv of its own, never in the service's (it is not one of the service's dependencies):

    python3 -m venv .venv-locust && .venv-locust/bin/pip install locust==2.47.0
    python -m bench.locust_load --users 50 200 500 --duration 60
    python -m bench.locust_load --users 5 --duration 10 --label smoke     # a smoke test

On a machine shared with other work, ``--wait-quiet 300`` waits (up to 300 s) for the CPU to be idle before each
level; the report says how many CPU seconds of each level went to the service, Locust and everything else.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import machine, start_service
from bench.load import percentile, read_rows, wait_until_quiet
from bench.results import ROOT, command_line, record
from models import find_model

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_LOCUST = ROOT / ".venv-locust" / "bin" / "locust"
HEALTH_GOAL_MS = 50
GOAL = (f"every client served or told when to retry: no errors, no unfinished log rows; /healthz p99 < "
        f"{HEALTH_GOAL_MS} ms under load (issue 20)")
PRIORITY_MIX = "interactive=3,default=5,batch=2"
LONG_SHARE = 0.2
SHORT_TOKENS, LONG_TOKENS = 16, 64  # max_tokens of a short and of a long prompt's chat


# -- the service ---------------------------------------------------------------------------------------------

def create_key(home: Path, role: str, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "appliance", "keys", "create", "--role", role, "--name", name,
                          "--home", str(home)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def chat_once(port: int, key: str) -> int:
    """One streamed chat read to its end (the warm-up, not counted); its status."""
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def get(port: int, path: str, key: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Prober:
    """Beside Locust, in this process: /healthz every 0.5 s (exact latencies, one connection per probe) and
    /api/status every second (the queue the service reports)."""

    def __init__(self, port: int, admin_key: str):
        self.port, self.key = port, admin_key
        self.health_ms: list[float] = []
        self.health_at: list[float] = []  # when each probe in health_ms began, s after the prober started
        self.health_failures = 0
        self.started = time.perf_counter()  # the clock each probe is timed on
        self.status: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._health, daemon=True),
                         threading.Thread(target=self._queue, daemon=True)]

    def __enter__(self) -> Prober:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _health(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                ok = get(self.port, "/healthz")[0] == 200
            except OSError:
                ok = False
            took = time.perf_counter() - began
            if ok:
                self.health_ms.append(took * 1000)
                self.health_at.append(began - self.started)
            else:
                self.health_failures += 1
            self._stop.wait(max(0.0, 0.5 - took))

    def _queue(self) -> None:
        while not self._stop.wait(1.0):
            try:
                status, body = get(self.port, "/api/status", self.key)
            except OSError:
                continue
            if status == 200:
                self.status.append(json.loads(body)["queue"])

    def summary(self) -> dict:
        queue = self.status
        slowest = sorted(zip(self.health_ms, self.health_at), reverse=True)[:5]
        return {"healthz": latency(self.health_ms) | {"failures": self.health_failures,
                                                      "slowest": [{"at_s": round(at, 1), "ms": round(ms, 1)}
                                                                  for ms, at in slowest]},
                "queue": {"samples": len(queue),
                          "max_depth": max((q["queue_depth"] for q in queue), default=None),
                          "max_busy_slots": max((q["busy_slots"] for q in queue), default=None),
                          "max_expected_wait_s": {name: max(q["expected_wait_s"][name] for q in queue)
                                                  for name in (queue[0]["expected_wait_s"] if queue else {})}}}


def latency(ms: list[float]) -> dict:
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms, default=None)}


def queue_idle(port: int, admin_key: str) -> bool:
    status, body = get(port, "/api/status", admin_key)
    queue = json.loads(body)["queue"] if status == 200 else {}
    return queue.get("busy_slots") == 0 and queue.get("queue_depth") == 0


def settle(home: Path, port: int, admin_key: str, after_id: int, longest: float = 120.0) -> tuple[list[dict], float]:
    """The level's log rows once every one is finished and the queue is empty (at most ``longest`` s); the seconds
    that took after Locust stopped (its users are stopped mid-stream at the end: those streams and waits are cut)."""
    began = time.monotonic()
    while True:
        rows = [r for r in read_rows(home, 1_000_000) if r["id"] > after_id]
        done = all(r["finished"] is not None for r in rows) and queue_idle(port, admin_key)
        if done or time.monotonic() - began > longest:
            return rows, time.monotonic() - began
        time.sleep(0.5)


def log_summary(rows: list[dict]) -> dict:
    statuses: dict[str, int] = {}
    for r in rows:
        key = "unfinished" if r["finished"] is None else str(r["status"])
        statuses[key] = statuses.get(key, 0) + 1
    return {"rows": len(rows), "unfinished": statuses.get("unfinished", 0), "by_status": dict(sorted(statuses.items())),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows)}


# -- Locust --------------------------------------------------------------------------------------------------

def locust_command(locust, users, spawn_rate, duration, csv_prefix, host) -> list[str]:
    return [str(locust), "-f", str(LOCUSTFILE.relative_to(ROOT)), "--headless", "-u", str(users), "-r", str(spawn_rate),
            "-t", f"{duration}s", "--csv", str(csv_prefix), "--host", host, "--only-summary", "--loglevel", "WARNING"]


def read_stats(prefix: Path) -> dict[str, dict]:
    """Locust's <prefix>_stats.csv by name: requests, failures, mean content size and the percentiles (ms)."""
    stats = {}
    with open(f"{prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            stats[row["Name"]] = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                  "avg_content": float(row["Average Content Size"]),
                                  "p50_ms": _number(row["50%"]), "p99_ms": _number(row["99%"]),
                                  "max_ms": _number(row["Max Response Time"]), "mean_ms": _number(row["Average Response Time"])}
    return stats


def read_failures(prefix: Path) -> list[dict]:
    path = Path(f"{prefix}_failures.csv")
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"name": r["Name"], "error": r["Error"][:300], "count": int(r["Occurrences"])} for r in csv.DictReader(f)]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # N/A
        return None


def level_figures(stats: dict[str, dict], duration: float, classes: list[str]) -> dict:
    """What the report shows of one level, from Locust's statistics."""
    empty = {"requests": 0, "failures": 0, "avg_content": 0.0, "p50_ms": None, "p99_ms": None, "max_ms": None,
             "mean_ms": None}
    entry = lambda name: stats.get(name, empty)  # noqa: E731
    chat = entry("chat")
    tokens = round(sum(entry(n)["requests"] * entry(n)["avg_content"] for n in ("chat short", "chat long")))
    return {
        "served": chat["requests"] - chat["failures"], "rejected": entry("rejected (429)")["requests"],
        "errors": chat["failures"],
        "served_short": entry("chat short")["requests"], "served_long": entry("chat long")["requests"],
        "ttft_p50_ms": entry("ttft")["p50_ms"], "ttft_p99_ms": entry("ttft")["p99_ms"],
        "completion_tokens": tokens, "tokens_per_s": tokens / duration,
        "by_class": {cls: {"served": entry(f"ttft {cls}")["requests"], "rejected": entry(f"retry-after {cls}")["requests"],
                           "ttft_p50_ms": entry(f"ttft {cls}")["p50_ms"], "ttft_p99_ms": entry(f"ttft {cls}")["p99_ms"],
                           "retry_after_mean_s": _seconds(entry(f"retry-after {cls}")["mean_ms"])}
                     for cls in classes},
        "healthz": {k: entry("healthz")[k] for k in ("requests", "failures", "p50_ms", "p99_ms", "max_ms")},
        "readyz": {k: entry("readyz")[k] for k in ("requests", "failures", "p50_ms", "p99_ms", "max_ms")},
    }


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


class CpuMeter:
    """CPU seconds over a level: the service (its HTTP process and runner), Locust (children this process has
    waited for), this process (the prober) and everything else on the machine (other people's work on a shared box)."""

    def __init__(self, service: psutil.Process):
        self.service = service
        self.start = self._read()

    def _read(self) -> dict:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        http = _cpu(self.service)
        runner = sum(_cpu(p) for p in self.service.children(recursive=True))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return {"busy": busy, "service": http + runner, "service_http": http, "service_runner": runner,
                "locust": children.ru_utime + children.ru_stime, "prober": me.ru_utime + me.ru_stime}

    def used(self) -> dict:
        end = self._read()
        used = {k: end[k] - self.start[k] for k in end}
        used["others"] = max(0.0, used["busy"] - used["service"] - used["locust"] - used["prober"])
        return {k: round(v, 1) for k, v in used.items()}


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def run_level(args, users: int, service: subprocess.Popen, port: int, home: Path, keys: list[str], admin_key: str,
              workdir: Path) -> dict:
    quiet = wait_until_quiet(longest=args.wait_quiet)
    after_id = max((r["id"] for r in read_rows(home, 1)), default=0)
    spawn_rate = args.spawn_rate or max(1, users // 10)
    prefix = workdir / f"locust-{users}"
    command = locust_command(args.locust, users, spawn_rate, args.duration, prefix, f"http://127.0.0.1:{port}")
    env = dict(os.environ, LOCUST_API_KEYS=",".join(keys), LOCUST_PRIORITY_MIX=PRIORITY_MIX,
               LOCUST_LONG_SHARE=str(LONG_SHARE), LOCUST_SHORT_TOKENS=str(SHORT_TOKENS),
               LOCUST_LONG_TOKENS=str(LONG_TOKENS))
    load_before = os.getloadavg()[0]
    meter = CpuMeter(psutil.Process(service.pid))
    began = time.monotonic()
    with Prober(port, admin_key) as prober, open(workdir / f"locust-{users}.log", "wb") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.duration + 300)
        wall = time.monotonic() - began
        cpu = meter.used()
        load_after = os.getloadavg()[0]
        rows, settle_s = settle(home, port, admin_key, after_id)
    stats = read_stats(prefix)
    classes = [part.split("=")[0] for part in PRIORITY_MIX.split(",")]
    return {"users": users, "spawn_rate": spawn_rate, "duration_s": args.duration, "locust_exit": proc.returncode,
            "locust_wall_s": round(wall, 1), "cpu_s": cpu, "waited_for_quiet_s": round(quiet, 1),
            "load_average": [round(load_before, 2), round(load_after, 2)],
            **level_figures(stats, args.duration, classes), "prober": prober.summary(),
            "settle_s": round(settle_s, 1), "log_rows": log_summary(rows), "failures": read_failures(prefix),
            "stats": stats}


# -- the report ----------------------------------------------------------------------------------------------

def fmt(value, digits: int = 0, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def markdown(data: dict) -> str:
    meta, levels = data["meta"], data["levels"]
    m = meta["machine"]
    lines = [
        "# Locust against the box: streaming chat users with keys, priority classes, short and long prompts",
        "",
        f"`{meta['locust_version']}`, headless, against a fresh service with default settings (slots, queue and "
        f"priority classes) and the bundled model `{meta['model']}` on {meta['threads']} threads; {meta['keys']} "
        f"user keys (keys required), each user holding one. Each user streams a chat completion, reads it to "
        f"`[DONE]`, waits 1-3 s and streams the next; {meta['long_share'] * 100:.0f}% of the prompts are long (a ~600-token "
        f"story to summarize, {meta['long_tokens']} tokens asked), the rest short ({meta['short_tokens']} tokens "
        f"asked); `X-Priority` mix {meta['priority_mix']}. A 429 is not an error: the user waits its `Retry-After`, "
        f"then its usual 1-3 s, before its next try. Each level runs {meta['duration_s']} s (Locust's `-t`, counted from its first user; "
        f"users start at users/10 per s, so all of them run after 10 s). "
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, shared by the service, Locust and the prober; {meta['date']}.",
        "",
        "| users | served | rejected (429 answers) | errors | TTFT p50 s | TTFT p99 s | tokens/s | healthz p50 / p99 / max ms "
        "| prober healthz p50 / p99 / max ms | queue depth max | unfinished rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        h, p = lv["healthz"], lv["prober"]["healthz"]
        lines.append(
            f"| {lv['users']} | {lv['served']} | {lv['rejected']} | {lv['errors']} | {fmt(lv['ttft_p50_ms'], 2, 1e-3)} | "
            f"{fmt(lv['ttft_p99_ms'], 2, 1e-3)} | {fmt(lv['tokens_per_s'], 1)} | {fmt(h['p50_ms'])} / {fmt(h['p99_ms'])} / "
            f"{fmt(h['max_ms'])} | {fmt(p['p50_ms'], 1)} / {fmt(p['p99_ms'], 1)} / {fmt(p['max_ms'], 1)} | "
            f"{fmt(lv['prober']['queue']['max_depth'])} | {lv['log_rows']['unfinished']} |")
    lines += ["", "By priority class (served / rejected, TTFT p50 and p99 s, mean Retry-After s):", "",
              "| users | " + " | ".join(meta["classes"]) + " |", "|---" * (len(meta["classes"]) + 1) + "|"]
    for lv in levels:
        cells = [f"{c['served']} / {c['rejected']}, TTFT {fmt(c['ttft_p50_ms'], 2, 1e-3)} / {fmt(c['ttft_p99_ms'], 2, 1e-3)}"
                 + (f", Retry-After {fmt(c['retry_after_mean_s'], 1)}" if c["rejected"] else "")
                 for c in (lv["by_class"][name] for name in meta["classes"])]
        lines.append(f"| {lv['users']} | " + " | ".join(cells) + " |")
    lines += ["", f"Goal ({GOAL}):", ""]
    lines += [f"- {lv['users']} users: {verdict(lv)}" for lv in levels]
    lines += ["", "Per level, besides: short / long chats served, health failures, the service's expected wait "
              "(the most `/api/status` reported, by class), the log's rows by status, CPU time by whom:", ""]
    for lv in levels:
        waits = ", ".join(f"{k} {fmt(v, 0)} s" for k, v in lv["prober"]["queue"]["max_expected_wait_s"].items())
        statuses = ", ".join(f"{k}: {v}" for k, v in lv["log_rows"]["by_status"].items())
        health_failures = lv["healthz"]["failures"] + lv["readyz"]["failures"] + lv["prober"]["healthz"]["failures"]
        lines.append(f"- {lv['users']} users: {lv['served_short']} short / {lv['served_long']} long; readyz p99 "
                     f"{fmt(lv['readyz']['p99_ms'])} ms; {health_failures} health failures; expected wait at most {waits}; "
                     f"busy slots at most {fmt(lv['prober']['queue']['max_busy_slots'])}; log rows {statuses}; "
                     f"settled {lv['settle_s']} s after Locust stopped; CPU s in the level's {lv['locust_wall_s']} s: "
                     f"service {lv['cpu_s']['service']} (HTTP process {lv['cpu_s']['service_http']}, runner "
                     f"{lv['cpu_s']['service_runner']}), Locust {lv['cpu_s']['locust']}, prober {lv['cpu_s']['prober']}, "
                     f"other processes {lv['cpu_s']['others']}; load average {lv['load_average'][0]} before, "
                     f"{lv['load_average'][1]} after.")
        for failure in lv["failures"][:5]:
            lines.append(f"  - {failure['count']} x {failure['name']}: {failure['error']}")
    lines += [
        "",
        "Served: chats read to `[DONE]` within the level's time; rejected: 429 answers (queue deadline or queue full), "
        "counted per try, not per user, each with a `Retry-After` the user then waited; errors: any other status, an error event, a stream cut short "
        "or a connection error. TTFT: from sending the chat to its first content token, so it includes the wait in the "
        "queue (a rejected try is not counted in it). Tokens/s: completion tokens of the served chats "
        "(`usage.completion_tokens`) over the level's time. healthz: Locust polls `/healthz` (and `/readyz`) every "
        "0.5 s in the same process as the users, so its figures include Locust's own delays (Locust keeps response "
        "times to 2 significant figures past 100 ms); the prober is a thread of the benchmark that opens a new "
        "connection to `/healthz` every 0.5 s; the goal is judged on the prober's figures. At the end of a level Locust stops its users at once: the streams and "
        "queue waits still open are cut (they are the log's 499 rows, not counted above); unfinished rows are counted "
        "once the log and queue have settled. The next level starts once the CPU is quiet again. One run, no repeats.",
        "",
        f"Locust: `{meta['locust_command']}` (with `LOCUST_API_KEYS`, `LOCUST_PRIORITY_MIX={meta['priority_mix']}`, "
        f"`LOCUST_LONG_SHARE={meta['long_share']}`).",
        "",
        f"Reproduce: `python3 -m venv .venv-locust && .venv-locust/bin/pip install {meta['locust_pin']}`, then "
        f"`{meta['command']}`",
    ]
    if meta.get("notes"):
        lines += ["", f"Note: {meta['notes']}"]
    return "\n".join(lines) + "\n"


def verdict(lv: dict) -> str:
    clean = lv["errors"] == 0 and lv["log_rows"]["unfinished"] == 0
    p99 = lv["prober"]["healthz"]["p99_ms"]
    healthy = p99 is not None and p99 < HEALTH_GOAL_MS and lv["prober"]["healthz"]["failures"] == 0
    return (f"served or told to retry {'✅' if clean else '❌'} ({lv['errors']} errors, {lv['log_rows']['unfinished']} "
            f"unfinished rows), /healthz p99 {fmt(p99, 1)} ms {'✅' if healthy else '❌'}")


def figure(data: dict) -> str:
    levels = data["levels"]
    if not levels:
        return "no level was run"
    join = lambda values: " / ".join(values)  # noqa: E731
    return (f"served / rejected at {join(str(lv['users']) for lv in levels)} users: "
            f"{join(str(lv['served']) + '/' + str(lv['rejected']) for lv in levels)}; "
            f"TTFT p50 {join(fmt(lv['ttft_p50_ms'], 1, 1e-3) for lv in levels)} s; "
            f"{join(fmt(lv['tokens_per_s'], 0) for lv in levels)} tok/s; "
            f"/healthz p99 {join(fmt(lv['prober']['healthz']['p99_ms'], 0) for lv in levels)} ms; "
            f"{sum(lv['errors'] for lv in levels)} errors, {sum(lv['log_rows']['unfinished'] for lv in levels)} "
            f"unfinished rows")


# -- the run -------------------------------------------------------------------------------------------------

def locust_version(locust: Path) -> str:
    out = subprocess.run([str(locust), "--version"], capture_output=True, text=True, timeout=60)
    return (out.stdout or out.stderr).strip().split(" from ")[0]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[50, 200, 500], help="user counts, one level each")
    parser.add_argument("--duration", type=int, default=60, help="seconds per level (Locust's -t)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default: users/10)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads (default 2)")
    parser.add_argument("--wait-quiet", type=float, default=15, help="before a level, wait up to this many s for "
                        "the CPU to be nearly idle (default 15)")
    parser.add_argument("--keys", type=int, default=4, help="user keys the users share (default 4)")
    parser.add_argument("--locust", type=Path, default=DEFAULT_LOCUST, help="the locust executable (default "
                        ".venv-locust/bin/locust)")
    parser.add_argument("--label", help="the run's id in bench/results/locust/runs/<date>-<id> (default: the commit)")
    parser.add_argument("--notes", help="a sentence for the report")
    args = parser.parse_args(argv)
    if not args.locust.is_file():
        raise SystemExit(f"no locust at {args.locust}: python3 -m venv .venv-locust && "
                         ".venv-locust/bin/pip install locust==2.47.0, or give --locust PATH")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-locust-"))
    home = workdir / "home"
    print(f"Locust's CSV and logs, the service's log and data folder: {workdir}", flush=True)
    keys = [create_key(home, "user", f"locust-{i}") for i in range(args.keys)]
    admin_key = create_key(home, "admin", "locust-bench")
    # No idle steps between levels, and no power profile touching the shared box; the rest is default.
    env = {"APPLIANCE_HOME": str(home), "APPLIANCE_IDLE_AFTER": "86400", "APPLIANCE_DEEP_IDLE_AFTER": "86400",
           "APPLIANCE_POWER_PROFILE": "none"}
    proc, port = start_service(args.threads, env, log=workdir / "appliance.log")
    levels = []
    try:
        if (status := chat_once(port, keys[0])) != 200:
            raise RuntimeError(f"the warm-up chat got HTTP {status} (the service's log: {workdir / 'appliance.log'})")
        model = json.loads(get(port, "/api/status", admin_key)[1])["model"]["id"]
        for users in args.users:
            levels.append(run_level(args, users, proc, port, home, keys, admin_key, workdir))
            lv = levels[-1]
            print(f"{users} users: {lv['served']} served, {lv['rejected']} rejected, {lv['errors']} errors, TTFT p50 "
                  f"{fmt(lv['ttft_p50_ms'])} ms p99 {fmt(lv['ttft_p99_ms'])} ms, {fmt(lv['tokens_per_s'], 1)} tok/s, "
                  f"healthz p99 {fmt(lv['prober']['healthz']['p99_ms'], 1)} ms, {lv['log_rows']['unfinished']} "
                  f"unfinished rows", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    host = "http://127.0.0.1:PORT"
    meta = {"model": model, "threads": args.threads, "keys": len(keys),
            "priority_mix": PRIORITY_MIX, "classes": [p.split("=")[0] for p in PRIORITY_MIX.split(",")],
            "long_share": LONG_SHARE, "short_tokens": SHORT_TOKENS, "long_tokens": LONG_TOKENS,
            "duration_s": args.duration, "locust_version": locust_version(args.locust), "locust_pin": "locust==2.47.0",
            "locust_command": " ".join(locust_command(".venv-locust/bin/locust", "USERS", "USERS/10", args.duration,
                                                      "PREFIX", host)),
            "machine": machine() | {"physical_cores": psutil.cpu_count(logical=False)},
            "date": time.strftime("%Y-%m-%d"), "command": command_line("locust_load", argv), "notes": args.notes}
    data = {"meta": meta, "levels": levels}
    run = record("locust", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(data), command=meta["command"],
                 report=markdown(data), data=data, inputs=[find_model("smollm2-135m-instruct").path, LOCUSTFILE],
                 label=args.label)
    print("report:", run / "report.md")


if __name__ == "__main__":
    main()
