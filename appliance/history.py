"""The last hour of requests in memory, minute by minute, for the web UI's status charts (no Prometheus needed).

Each finished request (the same hook the metrics use) lands in its minute's bucket: how many, how many failed
(5xx), its latency, time to first token and decode speed. ``series()`` answers the last ``minutes`` minutes with
the count and the p50/p95 of each figure; a minute with no request is there with a count of 0. Nothing is kept
past the hour and no thread runs: a bucket is made when its first request ends. Per bucket at most ``KEEP``
values of each figure are kept (then every other one is dropped), so a burst cannot grow memory without bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

KEEP = 2048


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RequestHistory:
    def __init__(self, minutes: int = 60, clock=time.time):
        self.minutes = minutes
        self.clock = clock
        self._buckets: OrderedDict[int, dict] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, logged) -> None:
        """Hook for LoggedRequest observers: add one finished request."""
        generation = logged.generation
        self.add(status=logged.status, seconds=logged.seconds,
                 ttft_ms=getattr(generation, "ttft_ms", None), tokens_per_s=getattr(generation, "tokens_per_s", None))

    def add(self, status: int | None, seconds: float | None, ttft_ms: float | None = None,
            tokens_per_s: float | None = None) -> None:
        minute = int(self.clock() // 60)
        with self._lock:
            bucket = self._buckets.get(minute)
            if bucket is None:
                bucket = self._buckets[minute] = {"count": 0, "errors": 0, "latency": [], "ttft": [], "tps": []}
                while self._buckets and next(iter(self._buckets)) <= minute - self.minutes:
                    self._buckets.popitem(last=False)
            bucket["count"] += 1
            bucket["errors"] += int(status is not None and status >= 500)
            for name, value in (("latency", seconds), ("ttft", ttft_ms / 1000 if ttft_ms is not None else None),
                                ("tps", tokens_per_s)):
                if value is not None:
                    values = bucket[name]
                    values.append(value)
                    if len(values) > KEEP:
                        del values[::2]

    def series(self) -> dict:
        """Per minute, oldest first: its start (epoch seconds), requests, 5xx, and p50/p95 of each figure."""
        now = int(self.clock() // 60)
        with self._lock:
            buckets = {m: {k: (list(v) if isinstance(v, list) else v) for k, v in b.items()}
                       for m, b in self._buckets.items()}
        out = {name: [] for name in ("time", "requests", "errors", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
                                     "ttft_p95_s", "tokens_per_s_p50")}
        for minute in range(now - self.minutes + 1, now + 1):
            b = buckets.get(minute, {"count": 0, "errors": 0, "latency": [], "ttft": [], "tps": []})
            out["time"].append(minute * 60)
            out["requests"].append(b["count"])
            out["errors"].append(b["errors"])
            out["latency_p50_s"].append(_quantile(b["latency"], 0.5))
            out["latency_p95_s"].append(_quantile(b["latency"], 0.95))
            out["ttft_p50_s"].append(_quantile(b["ttft"], 0.5))
            out["ttft_p95_s"].append(_quantile(b["ttft"], 0.95))
            out["tokens_per_s_p50"].append(_quantile(b["tps"], 0.5))
        return out
