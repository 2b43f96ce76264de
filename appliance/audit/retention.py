"""Log retention: how many of the oldest rows are over the limits, and the worker that prunes them.

``Database.prune`` deletes them: a prefix of the chain at a time, each behind a signed checkpoint of
its last row (``appliance.audit.chain``), so the rows left still verify. The limits are the
``log_keep_*`` settings (``appliance.config.Retention``).
"""

from __future__ import annotations

import logging
import threading

from appliance.config import Retention

log = logging.getLogger(__name__)


def excess_rows(retention: Retention, chained: int, used_bytes: int) -> int:
    """How many of the ``chained`` oldest rows to delete so that the rest keep within the row and size limits.

    The age limit is not counted here: it goes by the rows' own times (``Retention.cutoff``).
    """
    counts = [0]
    if retention.rows and chained > retention.rows:
        counts.append(chained - retention.rows)
    over = used_bytes - retention.megabytes * 2**20
    if retention.megabytes and chained and over > 0:
        # Rows are roughly alike: drop the share of them that is over, and a little more.
        counts.append(max(1, int(chained * min(1.0, over / used_bytes + 0.01))))
    return max(counts)


class RetentionWorker:
    """Prunes the log at start and then every ``every`` seconds, on a thread of its own."""

    def __init__(self, db, retention: Retention, every: float = 60.0):
        self.db, self.retention, self.every = db, retention, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-retention", daemon=True)

    def start(self) -> None:
        if self.retention.active:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pruned = self.db.prune(self.retention)
                if pruned:
                    log.info("log retention: pruned %d row(s)", pruned)
            except Exception:  # a full disk, a locked file: try again next time
                log.exception("log retention: pruning failed; trying again in %.0f s", self.every)
            self._stop.wait(self.every)
