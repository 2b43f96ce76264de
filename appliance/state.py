"""What one running service holds: its settings, database and models. Kept on the Flask app, not in globals."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app

from appliance.audit.retention import RetentionWorker
from appliance.config import Settings
from appliance.db import Database
from appliance.power import PowerManager
from appliance.pool import ModelPool


@dataclass
class AppState:
    settings: Settings
    db: Database
    models: ModelPool
    power: PowerManager
    retention: RetentionWorker
    shutting_down: threading.Event = field(default_factory=threading.Event)
    request_observers: list = field(default_factory=list)  # hook(LoggedRequest) once each logged request ends


def state() -> AppState:
    return current_app.extensions["appliance"]
