"""The box's own admin API: power state, models, status and the log; every change it makes is a log row."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import psutil
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from pydantic import BaseModel, ConfigDict, Field

from appliance import auth, gpu_memory, log_export
from appliance.api import request_log
from appliance.api.schemas import ImportRequest, PowerRequest, SwapRequest, parse_body
from appliance.backends.base import BackendError
from appliance.errors import APIError, InvalidRequest, ServiceUnavailable
from appliance.state import state
from appliance.timestamps import utcnow

bp = Blueprint("admin", __name__, url_prefix="/api")
request_log.attach(bp, record_body=True)  # what an admin changed, and with which key, is in the audit chain


@bp.get("/status")
def status():
    """Power state, time in state, last wake latency, model and system figures."""
    return jsonify(_status())


@bp.get("/status/history")
def status_history():
    """The last hour by minute, oldest first, from memory: requests, 5xx, p50/p95 latency and time to first
    token, median decode tokens/s (null for a minute without a request). Gone at a restart; Prometheus keeps more."""
    return jsonify(current_app.extensions["history"].series())


def _status() -> dict:
    st = state()
    default = st.models.default
    return st.power.status() | {"uptime_s": round(time.time() - psutil.Process().create_time(), 1),
                                "model": st.models.describe(default, internals=True),
                                "queue": default.admission.stats() | {"batch_size": default.runner.last_batch_size},
                                "models": st.models.status(),
                                "gpu": gpu_memory.read()}  # None without nvidia-ml-py or a GPU


@bp.get("/settings")
def settings():
    """Every setting: its value, where it came from (default, file, environment or flag), its environment
    variable and what it does. The config holds no secret (API keys live in the log as salted hashes; of the
    TLS key only its file's path is a setting), so nothing is masked."""
    from appliance.config import describe

    current = state().settings
    return jsonify({"config_file": current.config_file or None, "data": [
        {"name": name, "value": _plain(getattr(current, name)), "source": current.source(name),
         "environment": f"APPLIANCE_{name.upper()}", "help": text} for name, _default, text in describe()]})


def _plain(value):
    return str(value) if isinstance(value, Path) else value


@bp.get("/models")
def models():
    """Every model the box serves, with what only admins see: files, runner pids, memory estimates, queues."""
    pool = state().models
    return jsonify({"data": [pool.describe(m, internals=True) for m in pool.known()]})


@bp.get("/models/verify")
def verify_models():
    """Recompute the sha256 of every known model's files, as 'appliance models verify' does: ok and why, per model.

    It reads every file, so it takes seconds per GB."""
    from models import list_models, verify_model

    results = []
    for entry in list_models(home=state().settings.home):
        ok, detail = verify_model(entry)
        results.append({"name": entry.name, "ok": ok, "available": entry.available, "detail": detail})
    return jsonify({"data": results, "ok": all(r["ok"] or not r["available"] for r in results)})


@bp.post("/models/import")
def import_model():
    """Check an exported package tar on this box (links, paths, checksums, signature, manifest) and register it,
    as 'appliance models import' does; answered 201 with the model. Nothing is left behind when a check fails."""
    from models.manifest import ManifestError
    from models.registry import RegistryError
    from models.signing import SigningError
    from models.transfer import TransferError, import_and_register

    req = parse_body(request.get_data(), ImportRequest)
    archive = Path(req.path).expanduser()
    if not archive.is_file():
        raise InvalidRequest(f"no file {req.path!r} on this box: give the path of a tar made by "
                             "'appliance models export'", param="path", code="file_not_found")
    public_key = Path(req.public_key).expanduser() if req.public_key else None
    try:
        manifest, _folder = import_and_register(archive, state().settings.home, public_key)
    except (TransferError, ManifestError, RegistryError, SigningError) as exc:
        raise APIError(str(exc), param="path", code="import_failed", status=422) from None
    pool = state().models
    return jsonify(pool.describe(pool.get(manifest.name), internals=True)), 201


@bp.post("/models/<name>/load")
def load_model(name: str):
    """Load a model now (making room as a request would), so its first request has no load delay."""
    pool = state().models
    model = pool.get(name)
    try:
        pool.load(model, who=auth.client_id())
    except BackendError as exc:
        raise ServiceUnavailable(f"model {model.name!r} failed to load: {exc}", code="model_load_failed") from None
    return jsonify(pool.describe(model, internals=True))


@bp.post("/models/<name>/unload")
def unload_model(name: str):
    """Unload a model; refused with 409 while requests use it, unless ?force=true (they fail with 503)."""
    pool = state().models
    model = pool.get(name)
    pool.unload(model, who=auth.client_id(), force=_flag("force"))
    return jsonify(pool.describe(model, internals=True))


@bp.post("/models/<name>/swap")
def swap_model(name: str):
    """Point a model name or alias at another package, after a warm-up probe; a failed probe leaves the old one serving.

    Body: {"package": NAME_OR_PATH}: a catalog name or a package folder on this box."""
    req = parse_body(request.get_data(), SwapRequest)
    pool = state().models
    new, timings = pool.swap(name, pool.entry_for(req.package), who=auth.client_id())
    return jsonify(pool.describe(new, internals=True) | {"swap": timings})


@bp.get("/models/events")
def model_events():
    """Loads, unloads, evictions and expiries, newest first: who asked, how long it took, how it went."""
    return jsonify({"data": state().db.model_events(_limit_arg())})


@bp.post("/power")
def set_power():
    """Force a power state: {"state": "active" | "idle" | "deep_idle"}."""
    req = parse_body(request.get_data(), PowerRequest)
    state().power.set_state(req.state, "admin request")
    return jsonify(_status())


# -- keys: what 'appliance keys create / list / revoke' do, for the web UI's Keys page ----------------------
class KeyRequest(BaseModel):
    """A new API key. Its secret is in the answer once; only its salted hash is stored."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "admin", "auditor", "metrics"] = Field(description="what the key may call")
    name: str | None = Field(None, max_length=200, description="who or what the key is for")
    expires: str | None = Field(None, description="last valid date (2027-01-31) or ISO date-time, UTC unless zoned")
    priority: str | None = Field(None, description="priority class of the key's requests by default")
    rpm: int | None = Field(None, ge=0, description="requests per minute for this key (0: no limit)")
    tpm: int | None = Field(None, ge=0, description="generated tokens per minute for this key (0: no limit)")


@bp.get("/keys")
def list_keys():
    """Every key, oldest first: id, name, role, state (active, expired, revoked), priority, limits; never a key."""
    return jsonify({"data": [row | {"state": auth.key_state(row)} for row in state().db.api_keys()]})


@bp.post("/keys")
def create_key():
    """Create a key, answered once with its secret ("key"); the log row keeps the request, never the key.

    Creating the first key turns keys on for loopback clients too (auth "auto"): sign in with it next."""
    req = parse_body(request.get_data(), KeyRequest)
    classes = [c["name"] for c in state().settings.priority_classes]
    if req.priority is not None and req.priority not in classes:
        raise InvalidRequest(f"unknown priority class {req.priority!r}: use one of {', '.join(classes)}",
                             param="priority", code="invalid_value")
    try:
        expiry = auth.parse_expiry(req.expires) if req.expires else None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="expires", code="invalid_value") from None
    key_id, key = auth.new_key()
    fields = dict(name=req.name, role=req.role, priority=req.priority, expires=expiry, rpm=req.rpm, tpm=req.tpm)
    state().db.add_api_key(id=key_id, **fields, **auth.hash_secret(key))
    return jsonify({"id": key_id, "key": key, **fields}), 201


@bp.post("/keys/<key_id>/revoke")
def revoke_key(key_id: str):
    """Revoke a key by its id; refused from its next request on."""
    if not state().db.revoke_api_key(key_id):
        raise APIError(f"no active key {key_id!r}: GET /api/keys lists them", param="key_id", code="not_found",
                       status=404)
    return jsonify({"id": key_id, "revoked": True})


@bp.get("/logs")
def logs():
    """The most recent API requests from the SQLite log, newest first; ?offset=N skips the N newest.

    Prompts and responses only with ?text=true (their sha256 always): what people asked is read
    when someone means to, and only with an admin or auditor key where keys are in force.

    Filters (each optional, all must hold): ``model``, ``status`` (an HTTP status, or ``ok``, ``error``,
    ``cancelled``, ``open``), ``key_id``, ``priority`` (the class a request ran in), ``endpoint``, ``since`` and ``until`` (ISO 8601, UTC unless zoned),
    ``q`` (text in the prompt, response or error). ``has_more`` says whether an older page exists.
    """
    where, args = log_export.where_clause(log_export.parse_filters(request.args))
    limit = _limit_arg()
    rows = state().db.query_requests(where, args, limit=limit + 1, offset=_offset_arg())
    if not _flag("text"):
        rows = [log_export.without_texts(row) for row in rows]
    return jsonify({"data": rows[:limit], "has_more": len(rows) > limit})


@bp.get("/logs/<int:request_id>")
def log_row(request_id: int):
    """One request's row; its prompt and response only with ?text=true, as for the list."""
    rows = state().db.query_requests("id = ?", [request_id], limit=1)
    if not rows:
        raise APIError(f"no request {request_id} in the log (it may have been pruned by retention)",
                       param="request_id", code="not_found", status=404)
    return jsonify(rows[0] if _flag("text") else log_export.without_texts(rows[0]))


@bp.get("/logs/verify")
def verify_logs():
    """Check the log's hash chain and signed checkpoints, as 'appliance logs verify' does (admin and auditor keys).

    It reads its own snapshot of the file through a read-only connection, so the service writes on meanwhile."""
    from appliance.audit.keys import trusted_public_key
    from appliance.audit.verify import verify_log
    from appliance.db import Database

    settings = state().settings
    db = Database(settings.db_path, readonly=True)
    try:
        result = verify_log(db, trusted_public_key(settings.home), checkpoint_rows=settings.audit_checkpoint_rows)
    finally:
        db.close()
    return jsonify({"ok": result.ok, "rows": result.rows, "first_seq": result.first_seq, "last_seq": result.last_seq,
                    "signed_through": result.signed_through, "unsigned_tail": result.unsigned_tail,
                    "open_rows": result.open_rows, "problems": result.problems, "checked": utcnow()})


@bp.get("/logs/export")
def export_logs():
    """Every row matching the filters (as for /api/logs), newest first, streamed as ``?format=csv`` or ``jsonl``.

    Texts only with ?text=true. JSON Lines is what a SIEM or ELK ingests; CSV opens in a spreadsheet (a cell
    that would start a formula is prefixed with an apostrophe)."""
    where, args = log_export.where_clause(log_export.parse_filters(request.args))
    fmt, text = request.args.get("format", "jsonl"), _flag("text")
    body = log_export.export(state().db.iter_requests(where, args), fmt, text)
    mimetype = "text/csv" if fmt == "csv" else "application/x-ndjson"
    name = f"requests-{utcnow()[:19].replace(':', '')}.{fmt}"
    return Response(stream_with_context(body), mimetype=mimetype,
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _flag(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{name} must be true or false, got {raw!r}", param=name, code="invalid_value")
    return raw in ("true", "1")


def _limit_arg() -> int:
    """?limit=N, held to 1..1000 (default 50); not a whole number is a 400, not a silent 50."""
    raw = request.args.get("limit", "50")
    digits = raw[1:] if raw[:1] in ("+", "-") else raw
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise InvalidRequest(f"limit must be a whole number of rows, 1 to 1000, got {raw!r}", param="limit",
                             code="invalid_value")
    return max(1, min(int(raw), 1000))


def _offset_arg() -> int:
    raw = request.args.get("offset", "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidRequest(f"offset must be a whole number of rows to skip, 0 or more, got {raw!r}", param="offset",
                             code="invalid_value")
    return int(raw)


@bp.get("/power/events")
def power_events():
    """The most recent state changes, newest first."""
    return jsonify({"data": state().db.power_events(_limit_arg())})
