"""What the audit chain costs a request's log writes, and how long pruning takes.

Each request writes its row twice (at arrival, at its end). With the chain, the end also takes
SQLite's write lock at once, reads the chain's head and the row, writes the digest, and signs the
new head into audit-head.json; every ``audit_checkpoint_rows`` rows it signs a checkpoint. Measured
side by side in one run, on the same disk: the service's Database, and the same with chaining off.

    python -m bench.audit_overhead [--rows 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from appliance.audit.keys import AuditKey
from appliance.config import Retention
from appliance.db import Database
from bench.common import machine
from bench.results import command_line, record

PROMPT = "Summarise the maintenance log of line 3 for the night shift. " * 30  # ~1.8 KB, a typical prompt
RESPONSE = "Line 3 ran without stops; two filter changes at 02:10 and 04:40. " * 20


class Unchained(Database):
    """The log as it was before the audit chain: the same writes, no seq, no digest, no checkpoints."""

    def _chain(self, request_id: int) -> None:
        return None


def per_row_ms(db: Database, rows: int) -> float:
    start = time.perf_counter()
    for _ in range(rows):
        rid = db.start_request("/v1/chat/completions", "10.0.0.7", prompt=PROMPT, key_id="k1")
        db.finish_request(rid, status=200, response=RESPONSE, prompt_tokens=400, completion_tokens=300,
                          ttft_ms=120.5, total_ms=2400.25, tokens_per_s=150.0, finish_reason="stop")
    return (time.perf_counter() - start) * 1000 / rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = {"chained": [], "unchained": []}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        key = AuditKey.load_or_create(Path(tmp))
        for repeat in range(args.repeats):  # alternate, so drift on the box hits both alike
            for name, cls in (("chained", Database), ("unchained", Unchained)):
                db = cls(Path(tmp) / f"{name}-{repeat}.db", audit_key=key, checkpoint_rows=100)
                results[name].append(per_row_ms(db, args.rows))
                db.close()
        db = Database(Path(tmp) / "chained-0.db", audit_key=key)
        start = time.perf_counter()
        pruned = db.prune(Retention(rows=args.rows // 10))
        prune_s = time.perf_counter() - start
        db.close()
    chained, unchained = statistics.median(results["chained"]), statistics.median(results["unchained"])
    data = {"machine": machine(), "rows": args.rows, "repeats": args.repeats, "per_row_ms": results,
            "median_ms": {"chained": chained, "unchained": unchained}, "prune": {"rows": pruned, "seconds": prune_s}}
    lines = [
        "# Audit chain overhead on the request log",
        "",
        f"`python -m bench.audit_overhead --rows {args.rows} --repeats {args.repeats}` on {data['machine']['cpu']} "
        f"({data['machine']['logical_cpus']} CPUs): one request's two log writes (arrival and end, ~1.8 KB prompt, "
        "~1.3 KB answer), the service's Database against the same with chaining off, alternated in one run.",
        "",
        "| log | ms per request, median of repeats | runs |",
        "|---|---|---|",
        f"| chained (seq, digest, the signed head after each row, a checkpoint every 100) | {chained:.3f} | "
        f"{', '.join(f'{v:.3f}' for v in results['chained'])} |",
        f"| unchained (as before the audit chain) | {unchained:.3f} | "
        f"{', '.join(f'{v:.3f}' for v in results['unchained'])} |",
        "",
        f"The chain costs **{chained - unchained:.3f} ms per request** ({chained / unchained:.2f}x the log's own "
        f"writes). Pruning {pruned} of {args.rows} rows (batches of 2,000, each behind a signed checkpoint) "
        f"took {prune_s * 1000:.0f} ms.",
    ]
    run = record("audit_overhead", about=__doc__.splitlines()[0], goal="none set (issue 14): the cost is reported",
                 figure=figure(data), command=command_line("audit_overhead", argv), report="\n".join(lines) + "\n",
                 data=data)
    print((run / "report.md").read_text())


def figure(data: dict) -> str:
    chained, unchained = data["median_ms"]["chained"], data["median_ms"]["unchained"]
    return (f"the chain costs {chained - unchained:.3f} ms per request ({chained:.3f} against {unchained:.3f} ms); "
            f"pruning {data['prune']['rows']} rows took {data['prune']['seconds'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
