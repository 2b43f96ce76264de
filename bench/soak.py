"""Soak: many clients for a long time against one service; its memory, file descriptors and threads must stay flat.

    python -m bench.soak --minutes 30 --clients 16
    python -m bench.soak --minutes 2 --no-record     # smoke run: the report stays in its work folder

A fresh ``appliance serve`` (default settings, the bundled model, ``--threads 2``, a data folder of its own)
gets ``--clients`` threads that loop until the end, each picking its next request at random by weight:
non-streamed chats, streamed chats read to their end, streams dropped after their first event (the client
closes its socket), and bad inputs that must get their exact 4xx status and error code. max_tokens is 8 to
32, so many requests cycle. A few times during the run the clients pause, and once nothing is in flight the
box is forced idle (``POST /api/power``), held there, and woken by a request; once it is forced into
deep idle, which unloads the model: its runner process ends and the wake starts a new one (a new runner
generation). Every ``--sample-every`` seconds: the RSS of the HTTP process and of its runner, the HTTP
process's open file descriptors and threads, and the requests done. At the end the service is stopped
(SIGTERM), its log is read for rows never finished, and ``appliance logs verify`` checks its audit chain.

Judged after a warm-up (the first 10% of the run): RSS growth, the median of the last minute against the
median of the first minute after warm-up, for the HTTP process and for each runner generation (its own
warm-up of the same length counted from its start; samples taken while the clients were paused for a power
cycle are left out); fds and threads flat (max - min after warm-up within the bounds below); no errors; no
unfinished rows; ``logs verify`` passes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import PROMPTS, machine, start_service, stream_completion
from bench.results import command_line, record

GOAL = ("after warm-up RSS growth < 10% (HTTP process and runner), fds and threads flat, 0 errors, "
        "0 unfinished rows, logs verify passes (issue 20)")
RSS_GROWTH_LIMIT = 0.10
WARM_UP_SHARE = 0.10  # of the run
WINDOW_S = 60.0  # the first and last minute compared (shorter in a run under 10 minutes: its warm-up's length)
# Open fds of the HTTP process move with the connections in flight: each client holds at most one, and one
# just closed by a client may wait a moment for the server to notice. A leak of one fd per request of a
# few thousand would be far beyond this.
FD_SPREAD = lambda clients: 2 * clients + 8  # noqa: E731
THREAD_SPREAD = 4  # waitress's workers are made at start; a few helper threads may come and go
WEIGHTS = {"chat": 30, "stream": 30, "drop": 20, "bad": 20}
CYCLES = ((0.2, "idle"), (0.4, "deep_idle"), (0.6, "idle"), (0.8, "idle"))  # when (share of the run) and to what
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
# name: (method, path, body, expected status, expected error code)
BAD_INPUTS = {
    "malformed JSON": ("POST", CHAT, b"{not json", 400, "invalid_json"),
    "unknown model": ("POST", CHAT, {"model": "gpt-5", "messages": HI}, 404, "model_not_found"),
    "max_tokens negative": ("POST", CHAT, {"messages": HI, "max_tokens": -5}, 400, "invalid_value"),
    "unknown field": ("POST", CHAT, {"messages": HI, "tempreature": 0.5}, 400, "unknown_parameter"),
    "max_tokens beyond context": ("POST", CHAT, {"messages": HI, "max_tokens": 100_000}, 400,
                                  "context_length_exceeded"),
    "empty messages": ("POST", CHAT, {"messages": []}, 400, "invalid_value"),
    "unknown path": ("POST", "/v1/nope", {"messages": HI}, 404, "not_found"),
    "wrong method": ("GET", CHAT, None, 405, "method_not_allowed"),
}
KIND_NAMES = {"chat": "chat, not streamed", "stream": "chat, streamed to its end",
              "drop": "stream dropped after its first event", "bad": "bad input (exact 4xx expected)",
              "power": "forced power cycle"}
MAX_ERROR_SAMPLES = 20


class Tally:
    """Requests sent, ok and unexpected per kind; what is in flight; the first few unexpected results."""

    def __init__(self):
        self.lock = threading.Condition()
        self.kinds = {kind: {"sent": 0, "ok": 0, "errors": 0} for kind in [*WEIGHTS, "power"]}
        self.bad = {name: 0 for name in BAD_INPUTS}
        self.in_flight = 0
        self.done = 0
        self.error_samples: list[str] = []

    def start(self, kind: str) -> None:
        with self.lock:
            self.kinds[kind]["sent"] += 1
            self.in_flight += kind != "power"  # the clients' requests: what a power cycle waits for

    def end(self, kind: str, error: str | None, t: float) -> None:
        with self.lock:
            self.in_flight -= kind != "power"
            self.done += 1
            self.kinds[kind]["errors" if error else "ok"] += 1
            if error and len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(f"{t:.0f} s, {kind}: {error[:300]}")
            self.lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.in_flight == 0, timeout)


# -- the requests -------------------------------------------------------------------------------------------------

def chat_body(rng: random.Random, client: int, n: int, stream: bool, max_tokens: int | None = None) -> dict:
    text = f"({client}-{n}) {PROMPTS[rng.randrange(len(PROMPTS))]}"
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens or rng.randint(8, 32),
            "temperature": 0.7, "stream": stream}
    return body | ({"stream_options": {"include_usage": True}} if stream else {})


def call(port: int, method: str, path: str, body=None, timeout: float = 300) -> tuple[int, bytes]:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, raw, {"Content-Type": "application/json"} if raw is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def chat(port: int, body: dict) -> str | None:
    """A non-streamed chat: None when it answered as it should, else what was wrong."""
    status, raw = call(port, "POST", CHAT, body)
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    answer = json.loads(raw)
    tokens = answer["usage"]["completion_tokens"]
    if not isinstance(answer["choices"][0]["message"]["content"], str) or not 0 < tokens <= body["max_tokens"]:
        return f"odd answer: {raw[:200]!r}"
    return None


def stream(port: int, body: dict) -> str | None:
    run = stream_completion(port, body, CHAT)  # raises on a non-200 status or an error event
    if not run["done"]:
        return "stream ended without [DONE]"
    if not run["usage"] or not 0 < run["usage"]["completion_tokens"] <= body["max_tokens"]:
        return f"odd usage: {run['usage']}"
    return None


def drop(port: int, body: dict) -> str | None:
    """A stream the client leaves after its first event: it closes the socket mid-stream."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return f"HTTP {response.status}: {response.read()[:200]!r}"
        for raw in response:
            if raw.startswith(b"data: "):
                if b'"error"' in raw:
                    return f"error event: {raw[:200]!r}"
                break
        else:
            return "the stream ended before its first event"
        response.close()  # the response's file holds the socket open too
        return None
    finally:
        conn.close()


def bad(port: int, name: str) -> str | None:
    method, path, body, want_status, want_code = BAD_INPUTS[name]
    status, raw = call(port, method, path, body)
    try:
        code = json.loads(raw)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if (status, code) != (want_status, want_code):
        return f"{name}: HTTP {status} {code}, expected {want_status} {want_code}: {raw[:200]!r}"
    return None


def client_loop(port: int, client: int, seed: int, deadline: float, gate: threading.Event, tally: Tally,
                start: float, halt: threading.Event) -> None:
    rng = random.Random(seed * 1000 + client)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    for n in range(10**9):
        gate.wait()
        if time.monotonic() >= deadline or halt.is_set():
            return
        kind = rng.choices(kinds, weights)[0]
        name = rng.choice(list(BAD_INPUTS)) if kind == "bad" else None
        tally.start(kind)
        try:
            if kind == "chat":
                error = chat(port, chat_body(rng, client, n, stream=False))
            elif kind == "stream":
                error = stream(port, chat_body(rng, client, n, stream=True))
            elif kind == "drop":
                error = drop(port, chat_body(rng, client, n, stream=True, max_tokens=32))
            else:
                error = bad(port, name)
                with tally.lock:
                    tally.bad[name] += 1
        except Exception as exc:  # a timeout, a reset connection, a body that is not JSON: all unexpected
            error = f"{exc.__class__.__name__}: {exc}"
        tally.end(kind, error, time.monotonic() - start)


# -- watching the service ---------------------------------------------------------------------------------------

def runner_of(service: psutil.Process) -> psutil.Process | None:
    """The service's model runner (its child ``appliance.runner.worker``), the newest if two overlap; None in deep idle."""
    found = []
    for child in service.children(recursive=True):
        try:
            if "appliance.runner.worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return max(found, key=lambda p: p.create_time(), default=None)


def take_sample(service: psutil.Process, t: float, phase: str, tally: Tally) -> dict:
    runner = runner_of(service)
    try:
        runner_rss = runner.memory_info().rss if runner else None
    except psutil.Error:  # it ended meanwhile
        runner, runner_rss = None, None
    with tally.lock:
        done = tally.done
    return {"t": round(t, 1), "phase": phase, "http_rss": service.memory_info().rss, "fds": service.num_fds(),
            "threads": service.num_threads(), "runner_pid": runner.pid if runner else None, "runner_rss": runner_rss,
            "done": done}


def power_cycle(port: int, target: str, hold: float, gate: threading.Event, tally: Tally, service: psutil.Process,
                start: float) -> dict:
    """Pause the clients, force the state once nothing is in flight, hold it, wake the box with a request."""
    t0 = time.monotonic()
    cycle = {"t": round(t0 - start, 1), "state": target}
    gate.clear()
    tally.start("power")
    error = None
    try:
        if not tally.wait_idle(300):
            raise RuntimeError("the clients' requests did not end within 300 s")
        for _ in range(600):  # the box may still be ending a stream a client dropped
            if json.loads(call(port, "GET", "/api/status")[1])["requests_in_flight"] == 0:
                break
            time.sleep(0.1)
        cycle["drained_s"] = round(time.monotonic() - t0, 2)
        before = runner_of(service)
        status, raw = call(port, "POST", "/api/power", {"state": target})
        if status != 200:
            raise RuntimeError(f"POST /api/power {target}: HTTP {status}: {raw[:200]!r}")
        time.sleep(hold)
        status_now = json.loads(call(port, "GET", "/api/status")[1])
        held = runner_of(service)
        cycle |= {"state_seen": status_now["state"], "model_loaded": status_now["model"]["loaded"],
                  "runner_while_held": held.pid if held else None}
        if status_now["state"] != target or (target == "deep_idle") == bool(held):
            raise RuntimeError(f"after POST {target}: state {status_now['state']}, runner {cycle['runner_while_held']}")
        woke = time.perf_counter()
        error = chat(port, {"messages": HI, "max_tokens": 8})
        cycle["wake_request_ms"] = round((time.perf_counter() - woke) * 1000)
        after_status = json.loads(call(port, "GET", "/api/status")[1])
        after = runner_of(service)
        cycle |= {"state_after": after_status["state"], "runner_before": before.pid if before else None,
                  "runner_after": after.pid if after else None}
        if not error and after_status["state"] != "active":
            error = f"the wake request left the box {after_status['state']}"
        if not error and (cycle["runner_before"] == cycle["runner_after"]) == (target == "deep_idle"):
            error = f"runner {cycle['runner_before']} -> {cycle['runner_after']} after {target}"
    except Exception as exc:
        error = f"{exc.__class__.__name__}: {exc}"
    finally:
        tally.end("power", error, time.monotonic() - start)
        gate.set()
    cycle |= {"error": error, "end_t": round(time.monotonic() - start, 1)}
    print(f"{cycle['t']:.0f} s: {target} and wake: {error or 'ok'} (wake request {cycle.get('wake_request_ms')} ms)",
          flush=True)
    return cycle


def stop_service(proc: subprocess.Popen, timeout: float = 60) -> int | str:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"did not stop within {timeout:.0f} s of SIGTERM: killed"


def log_rows(home: Path) -> dict:
    from appliance.db import Database

    db = Database(home / "logs.db", readonly=True)
    try:
        rows = db.recent_requests(10**9)
    finally:
        db.close()
    statuses: dict[str, int] = {}
    for row in rows:
        key = str(row["status"]) if row["finished"] else "unfinished"
        statuses[key] = statuses.get(key, 0) + 1
    return {"rows": len(rows), "unfinished": sum(1 for r in rows if not r["finished"]),
            "by_status": dict(sorted(statuses.items()))}


def logs_verify(home: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "appliance", "logs", "verify", "--home", str(home)],
                         capture_output=True, text=True, timeout=600)
    return {"exit_status": out.returncode, "output": (out.stdout + out.stderr).strip()[-2000:]}


# -- the run ------------------------------------------------------------------------------------------------------

def soak(args, workdir: Path) -> dict:
    home = workdir / "home"
    load_average = os.getloadavg()
    proc, port = start_service(args.threads, {**args.env, "APPLIANCE_HOME": str(home)}, log=workdir / "serve.log")
    service = psutil.Process(proc.pid)
    print(f"service pid {proc.pid} on port {port}, its data folder {home}; runner pid "
          f"{getattr(runner_of(service), 'pid', None)}", flush=True)
    tally, gate = Tally(), threading.Event()
    gate.set()
    duration = args.minutes * 60
    start = time.monotonic()
    deadline = start + duration
    samples: list[dict] = []
    cycles: list[dict] = []
    phase = ["load"]
    stop_sampling, halt = threading.Event(), threading.Event()  # halt: the service died, the clients stop early
    died_at = None

    def sampler():
        for k in range(1, 10**9):
            t = time.monotonic() - start
            try:
                samples.append(take_sample(service, t, phase[0], tally))
            except psutil.Error as exc:
                print(f"sample at {t:.0f} s failed: {exc}", flush=True)
            if stop_sampling.wait(max(0.0, start + k * args.sample_every - time.monotonic())):
                return

    def controller():
        for share, target in CYCLES:
            wait = start + share * duration - time.monotonic()
            if stop_sampling.wait(max(0.0, wait)) or time.monotonic() >= deadline:
                return
            phase[0] = "cycle"
            cycles.append(power_cycle(port, target, args.hold, gate, tally, service, start))
            phase[0] = "load"

    try:
        threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=controller, daemon=True),
                   *(threading.Thread(target=client_loop, args=(port, c, args.seed, deadline, gate, tally, start, halt),
                                      daemon=True) for c in range(args.clients))]
        for thread in threads:
            thread.start()
        next_report = 60.0
        while any(t.is_alive() for t in threads[2:]):
            time.sleep(1)
            elapsed = time.monotonic() - start
            if proc.poll() is not None and not halt.is_set():
                died_at = round(elapsed, 1)
                print(f"{elapsed:.0f} s: the service exited with status {proc.returncode}; stopping", flush=True)
                halt.set()
                gate.set()
            if elapsed >= next_report and samples:
                s = samples[-1]
                print(f"{elapsed / 60:.0f} min: {s['done']} requests done, HTTP RSS {s['http_rss'] / 2**20:.1f} MiB, "
                      f"runner {(s['runner_rss'] or 0) / 2**20:.1f} MiB, fds {s['fds']}, threads {s['threads']}, "
                      f"errors {sum(k['errors'] for k in tally.kinds.values())}", flush=True)
                next_report += 60
        stop_sampling.set()  # the clients are done, so no power cycle is under way: the controller ends at once
        threads[1].join(30)
        threads[0].join(30)
        elapsed = time.monotonic() - start
    finally:
        exit_status = stop_service(proc)
        leftover = []
        for pid in {s["runner_pid"] for s in samples if s["runner_pid"]}:  # a runner of ours outliving its service
            try:
                runner = psutil.Process(pid)
                if "appliance.runner.worker" in " ".join(runner.cmdline()):
                    leftover.append(pid)
                    runner.kill()
            except psutil.Error:
                pass
    meta = {"model": "smollm2-135m-instruct (bundled)", "threads": args.threads, "clients": args.clients,
            "minutes": args.minutes, "elapsed_s": round(elapsed, 1), "sample_every_s": args.sample_every,
            "hold_s": args.hold, "seed": args.seed, "weights": WEIGHTS, "warm_up_s": round(WARM_UP_SHARE * duration, 1),
            "window_s": min(WINDOW_S, WARM_UP_SHARE * duration), "fd_spread_bound": FD_SPREAD(args.clients),
            "thread_spread_bound": THREAD_SPREAD, "http_pid": proc.pid, "env": args.env,
            "machine": machine() | {"physical_cores": psutil.cpu_count(logical=False)},
            "load_average": load_average, "load_average_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line("soak", args.argv)}
    data = {"meta": meta, "service_died_at_s": died_at, "requests": tally.kinds, "bad_inputs": tally.bad,
            "error_samples": tally.error_samples, "cycles": cycles, "samples": samples, "service_exit_status": exit_status,
            "runners_left_running": leftover, "log": log_rows(home), "logs_verify": logs_verify(home)}
    data["verdict"] = judge(data)
    return data


# -- the judgement and the report -------------------------------------------------------------------------------

def growth(samples: list[dict], key: str, warm_up: float, window: float) -> dict | None:
    """Median of the first window after warm-up against the median of the last window; None when too short."""
    load = [s for s in samples if s["phase"] == "load" and s[key] is not None]
    if not load:
        return None
    begin, end = load[0]["t"] + warm_up, load[-1]["t"]
    first = [s[key] for s in load if begin <= s["t"] < begin + window]
    last = [s[key] for s in load if s["t"] > end - window]
    if end - begin < 2 * window or not first or not last:
        return None
    a, b = statistics.median(first), statistics.median(last)
    return {"first_mib": round(a / 2**20, 1), "last_mib": round(b / 2**20, 1), "growth": round(b / a - 1, 4),
            "from_s": load[0]["t"], "to_s": end, "samples": len(load)}


def generations(samples: list[dict]) -> list[list[dict]]:
    """The samples of each runner process, in the order they first appeared."""
    gens: dict[int, list[dict]] = {}
    for s in samples:
        if s["runner_pid"] is not None:
            gens.setdefault(s["runner_pid"], []).append(s)
    return list(gens.values())


def spread(samples: list[dict], key: str, after: float) -> dict:
    values = [s[key] for s in samples if s["t"] >= after]
    return {"min": min(values), "max": max(values), "spread": max(values) - min(values)} if values else {}


def judge(data: dict) -> dict:
    meta, samples = data["meta"], data["samples"]
    warm, window = meta["warm_up_s"], meta["window_s"]
    http = growth(samples, "http_rss", warm, window)
    runners = []
    for n, gen in enumerate(generations(samples), 1):
        runners.append({"generation": n, "pid": gen[0]["runner_pid"], **(growth(gen, "runner_rss", warm, window)
                                                                           or {"growth": None, "from_s": gen[0]["t"],
                                                                               "to_s": gen[-1]["t"]})})
    judged = [r for r in runners if r["growth"] is not None]
    fds, threads = spread(samples, "fds", warm), spread(samples, "threads", warm)
    errors = sum(k["errors"] for k in data["requests"].values())
    checks = {
        "HTTP process RSS growth < 10%": http is not None and http["growth"] < RSS_GROWTH_LIMIT,
        "runner RSS growth < 10% (each generation long enough to judge)":
            bool(judged) and all(r["growth"] < RSS_GROWTH_LIMIT for r in judged),
        f"open fds flat (max - min <= {meta['fd_spread_bound']})": bool(fds) and fds["spread"] <= meta["fd_spread_bound"],
        f"threads flat (max - min <= {meta['thread_spread_bound']})":
            bool(threads) and threads["spread"] <= meta["thread_spread_bound"],
        "0 errors": errors == 0 and data.get("service_died_at_s") is None,
        "0 unfinished rows": data["log"]["unfinished"] == 0,
        "logs verify passes": data["logs_verify"]["exit_status"] == 0,
    }
    return {"http_rss": http, "runners": runners, "fds": fds, "threads": threads, "errors": errors,
            "checks": checks, "passed": all(checks.values())}


def settings_text(env: dict | None) -> str:
    if not env:
        return "default settings"
    return "default settings but " + ", ".join(f"`{name}={value}`" for name, value in env.items())


def parse_env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("APPLIANCE_") or name == "APPLIANCE_HOME":
        raise argparse.ArgumentTypeError(f"{text!r}: expected APPLIANCE_<SETTING>=VALUE (not APPLIANCE_HOME)")
    return name, value


def mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def markdown(data: dict) -> str:
    meta, verdict = data["meta"], judge(data)
    m = meta["machine"]
    total = {k: sum(v[k] for v in data["requests"].values()) for k in ("sent", "ok", "errors")}
    lines = [
        "# Soak: memory, file descriptors and threads of the service under a long mixed load",
        "",
        f"{meta['clients']} clients for {meta['minutes']:g} minutes ({meta['elapsed_s']:.0f} s) against a fresh "
        f"`appliance serve` with {settings_text(meta.get('env'))}, the bundled {meta['model']} and {meta['threads']} threads. "
        f"{m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical CPUs), Python {m['python']}, "
        f"llama-cpp-python {m['llama_cpp_python']}; {meta['date']}; load average {meta['load_average'][0]:.1f} at "
        f"the start, {meta['load_average_end'][0]:.1f} at the end. Warm-up: the first {meta['warm_up_s']:.0f} s "
        f"(10% of the run); a sample every {meta['sample_every_s']:g} s.",
        "",
        f"**{'All goals met' if verdict['passed'] else 'Goals missed'}** ({GOAL}):",
        "",
        *[f"- {mark(ok)} {name}" for name, ok in verdict["checks"].items()],
        "",
        "![RSS, fds and threads over time](report.png)",
        "",
        "## Memory after warm-up",
        "",
        f"Median RSS of the first {meta['window_s']:.0f} s after warm-up against that of the last "
        f"{meta['window_s']:.0f} s; samples taken while the clients were paused for a power cycle are left out. "
        "A runner generation is one runner process: deep idle ends it and the wake starts the next, whose "
        "warm-up counts from its own start.",
        "",
        "| process | samples from - to (s) | first MiB | last MiB | growth |",
        "|---|---|---|---|---|",
    ]
    http = verdict["http_rss"]
    if http:
        lines.append(f"| HTTP process (pid {meta['http_pid']}) | {http['from_s']:.0f} - {http['to_s']:.0f} | "
                     f"{http['first_mib']:.1f} | {http['last_mib']:.1f} | {pct(http['growth'])} |")
    for r in verdict["runners"]:
        if r["growth"] is None:
            lines.append(f"| runner generation {r['generation']} (pid {r['pid']}) | {r['from_s']:.0f} - "
                         f"{r['to_s']:.0f} | - | - | too short to judge |")
        else:
            lines.append(f"| runner generation {r['generation']} (pid {r['pid']}) | {r['from_s']:.0f} - "
                         f"{r['to_s']:.0f} | {r['first_mib']:.1f} | {r['last_mib']:.1f} | {pct(r['growth'])} |")
    fds, threads = verdict["fds"], verdict["threads"]
    lines += [
        "",
        f"HTTP process after warm-up: open fds {fds.get('min')} to {fds.get('max')} (bound on max - min: "
        f"{meta['fd_spread_bound']}, twice the clients plus 8: each client holds at most one connection, and one "
        f"it just closed may wait for the server to notice); threads {threads.get('min')} to {threads.get('max')} "
        f"(bound {meta['thread_spread_bound']}).",
        "",
        "## Requests",
        "",
        "| kind | weight | sent | ok | unexpected |",
        "|---|---|---|---|---|",
    ]
    for kind, counts in data["requests"].items():
        weight = meta["weights"].get(kind, "-")
        lines.append(f"| {KIND_NAMES[kind]} | {weight} | {counts['sent']} | {counts['ok']} | {counts['errors']} |")
    lines += [f"| all | | {total['sent']} | {total['ok']} | {total['errors']} |", ""]
    lines.append("Bad inputs sent: " + ", ".join(
        f"{name} ({BAD_INPUTS[name][3]} {BAD_INPUTS[name][4]}) {n}" for name, n in data["bad_inputs"].items()) + ".")
    if data["error_samples"]:
        lines += ["", "Unexpected results (the first ones):", "", *[f"- `{e}`" for e in data["error_samples"]]]
    lines += ["", "## Power cycles", "",
              "The clients pause; once nothing is in flight the state is forced, held "
              f"{meta['hold_s']:g} s and a chat wakes the box.", "",
              "| at (s) | forced | seen | runner before -> after | wake request ms | clients paused (s) | result |",
              "|---|---|---|---|---|---|---|"]
    for c in data["cycles"]:
        paused = f"{c['end_t'] - c['t']:.0f}" if "end_t" in c else "-"
        lines.append(f"| {c['t']:.0f} | {c['state']} | {c.get('state_seen', '-')} | {c.get('runner_before', '-')} -> "
                     f"{c.get('runner_after', '-')} | {c.get('wake_request_ms', '-')} | {paused} | {c['error'] or 'ok'} |")
    log, verify = data["log"], data["logs_verify"]
    lines += ["", "## At the end", ""]
    if data.get("service_died_at_s") is not None:
        lines.append(f"- **The service exited by itself {data['service_died_at_s']:.0f} s into the run**; the clients stopped.")
    lines += [
        f"- The service, sent SIGTERM: exit status {data['service_exit_status']}; runner processes left running: "
        f"{len(data['runners_left_running'])}.",
        f"- Its log: {log['rows']} rows, {log['unfinished']} unfinished; by status: "
        + ", ".join(f"{status} {n}" for status, n in log["by_status"].items()) + ".",
        f"- `appliance logs verify`: exit status {verify['exit_status']}: `{verify['output']}`",
        "",
        f"Reproduce: `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def figure(data: dict) -> str:
    v = judge(data)
    runners = ", ".join(pct(r["growth"]) for r in v["runners"] if r["growth"] is not None) or "-"
    log = data["log"]
    return (f"{mark(v['passed'])} after warm-up RSS growth: HTTP process {pct((v['http_rss'] or {}).get('growth'))}, "
            f"runner {runners}; fds {v['fds'].get('min')}-{v['fds'].get('max')}, threads "
            f"{v['threads'].get('min')}-{v['threads'].get('max')}; {v['errors']} errors, {log['unfinished']} unfinished "
            f"rows; logs verify {'OK' if data['logs_verify']['exit_status'] == 0 else 'FAILED'}")


def draw(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, meta = data["samples"], data["meta"]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    minutes = lambda rows: [s["t"] / 60 for s in rows]  # noqa: E731
    top.plot(minutes(samples), [s["http_rss"] / 2**20 for s in samples], color="tab:blue")
    top.set_ylabel("HTTP process RSS (MiB)")
    for n, gen in enumerate(generations(samples), 1):
        middle.plot(minutes(gen), [s["runner_rss"] / 2**20 for s in gen], label=f"runner generation {n} (pid {gen[0]['runner_pid']})")
    middle.set_ylabel("runner RSS (MiB)")
    middle.legend(loc="best", fontsize="small")
    bottom.plot(minutes(samples), [s["fds"] for s in samples], color="tab:green", label="open fds")
    bottom.set_ylabel("HTTP process open fds")
    twin = bottom.twinx()
    twin.plot(minutes(samples), [s["threads"] for s in samples], color="tab:purple", label="threads")
    twin.set_ylabel("HTTP process threads")
    bottom.legend(handles=[*bottom.get_lines(), *twin.get_lines()], loc="best", fontsize="small")
    bottom.set_xlabel("minutes")
    verdict = judge(data)
    limits = [(top, verdict["http_rss"])] + [(middle, r) for r in verdict["runners"] if r["growth"] is not None]
    for axis, judged in limits:
        if judged:  # where the last minute's median would have to stay below
            axis.axhline(judged["first_mib"] * (1 + RSS_GROWTH_LIMIT), color="0.5", lw=0.8, ls=":")
    for axis in (top, middle, bottom):
        axis.axvspan(0, meta["warm_up_s"] / 60, color="0.9", zorder=0)
        for c in data["cycles"]:
            color = "tab:red" if c["state"] == "deep_idle" else "tab:orange"
            axis.axvspan(c["t"] / 60, c.get("end_t", c["t"]) / 60, color=color, alpha=0.15, lw=0)
        axis.grid(alpha=0.3)
    top.set_title(f"Soak: {meta['clients']} clients, {meta['minutes']:g} min (grey: warm-up; orange: clients paused, "
                  "forced idle and woken;\nred: the same with deep idle; dotted: 10% above the first minute after warm-up)",
                  fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="inference threads (default 2)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each forced power state is held (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", type=parse_env, action="append", default=[], metavar="APPLIANCE_NAME=VALUE",
                        help="a setting for the service, as an environment variable (repeatable); the report names it")
    parser.add_argument("--label", help="the run's id in bench/results/soak/runs/<date>-<id> (default: the commit)")
    parser.add_argument("--no-record", action="store_true",
                        help="a smoke run: the report stays in the work folder, nothing goes under bench/results")
    args = parser.parse_args(argv)
    args.argv = argv
    args.env = dict(args.env)
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    print(f"work folder (service log, data folder): {workdir}", flush=True)
    data = soak(args, workdir)
    png = workdir / "report.png"
    draw(data, png)
    if args.no_record:
        (workdir / "report.json").write_text(json.dumps(data, indent=2) + "\n")
        (workdir / "report.md").write_text(markdown(data))
        print(markdown(data))
        print(f"not recorded: {workdir}/report.md, report.json, report.png")
    else:
        from models import find_model

        run = record("soak", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(data), command=data["meta"]["command"],
                     report=markdown(data), data=data, files={"report.png": png},
                     inputs=[find_model("smollm2-135m-instruct").path], label=args.label)
        print((run / "report.md").read_text())
        print("recorded:", run)
    print(figure(data))
    sys.exit(0 if data["verdict"]["passed"] else 1)


if __name__ == "__main__":
    main()
