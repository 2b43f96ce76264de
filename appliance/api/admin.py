"""The box's own admin API: power state and status."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from appliance.api.schemas import PowerRequest, parse_body
from appliance.errors import InvalidRequest
from appliance.state import state

bp = Blueprint("admin", __name__, url_prefix="/api")


@bp.get("/status")
def status():
    """Power state, time in state, last wake latency, model and system figures."""
    return jsonify(_status())


def _status() -> dict:
    st = state()
    return st.power.status() | {"queue": st.admission.stats() | {"batch_size": st.runner.last_batch_size}}


@bp.post("/power")
def set_power():
    """Force a power state: {"state": "active" | "idle" | "deep_idle"}."""
    req = parse_body(request.get_data(), PowerRequest)
    state().power.set_state(req.state, "admin request")
    return jsonify(_status())


@bp.get("/logs")
def logs():
    """The most recent API requests from the SQLite log, newest first; ?offset=N skips the N newest."""
    limit = request.args.get("limit", default=50, type=int)
    offset = _offset_arg()
    return jsonify({"data": state().db.recent_requests(max(1, min(limit, 1000)), offset=offset)})


def _offset_arg() -> int:
    raw = request.args.get("offset", "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidRequest(f"offset must be a whole number of rows to skip, 0 or more, got {raw!r}", param="offset",
                             code="invalid_value")
    return int(raw)


@bp.get("/power/events")
def power_events():
    """The most recent state changes, newest first."""
    limit = request.args.get("limit", default=50, type=int)
    return jsonify({"data": state().db.power_events(max(1, min(limit, 1000)))})
