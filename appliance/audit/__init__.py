"""The request log as an audit trail: a hash chain, signed checkpoints, retention and redaction.

Chain (``chain``). When a request row is finished it takes the next sequence number
``seq`` and ``digest = sha256(previous digest + the row)``: the row's every non-NULL
column in canonical JSON. A row changed afterwards no longer matches its digest;
a row deleted leaves a gap in ``seq``. Rows are chained in the order they finish,
which is the order they stop changing.

Signatures (``keys``, ``chain``). sha256 has no key, so someone who edits a row could
recompute every digest after it. The service signs the chain's head (seq and digest)
with an Ed25519 key kept beside the database (``audit-key.pem``, readable by the
service only): into ``audit-head.json`` after every row, which also shows rows deleted
from the end, and as a checkpoint row every ``audit_checkpoint_rows`` rows, at
shutdown and before pruning. A rewritten chain no longer meets its signed heads
(``verify``).

Retention (``retention``). Pruning deletes the oldest rows (lowest seq) and first writes
a signed checkpoint holding the digest of the last deleted row, so the rows left still
verify from there.

Redaction (``redaction``). Patterns from the config are replaced before text is stored,
and stored text is capped; the sha256 of the original text is always kept.

These modules compute, sign and check; ``appliance.db`` owns the SQLite file and runs
every read and write they need, in its own transactions.
"""
