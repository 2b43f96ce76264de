"""Liveness and readiness probes, for systemd, a watchdog or a load balancer."""

from __future__ import annotations

from flask import Blueprint, jsonify

from appliance.errors import ServiceUnavailable
from appliance.state import state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up and answering."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """The default model is loaded and requests will be served without a load delay. Anyone on the LAN may
    ask: the answer names no file and no process (GET /api/status, with an admin key where keys are on, does)."""
    runner = state().models.default.runner
    if state().shutting_down.is_set():
        raise ServiceUnavailable("the service is shutting down", code="shutting_down")
    power = state().power.state
    if not state().db.probe_write():  # generation is refused while it cannot be logged; this clears by itself
        raise ServiceUnavailable(f"the request log cannot be written: {state().db.log_error}", code="log_unavailable")
    if runner.load_error:  # the next request tries the load again
        raise ServiceUnavailable(f"model {runner.name!r} failed to load; GET /api/status shows why",
                                 code="model_load_failed")
    if not runner.is_loaded and power != "deep_idle":  # deep idle serves: the next request reloads
        raise ServiceUnavailable(f"model {runner.name!r} is not loaded yet", code="model_not_loaded")
    return jsonify({"status": "ready", "power_state": power, "model": runner.info(),
                    "models_loaded": [m.name for m in state().models.loaded()]})
