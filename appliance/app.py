"""The Flask application factory."""

from __future__ import annotations

from flask import Flask

from appliance import api, auth, metrics
from appliance.api import error_handlers
from appliance.audit.retention import RetentionWorker
from appliance.config import Settings, load_settings
from appliance.db import Database
from appliance.power import PowerManager
from appliance.pool import ModelPool
from appliance.state import AppState
from models import find_model, list_models


def create_app(settings: Settings | None = None, models: ModelPool | None = None, db: Database | None = None) -> Flask:
    """Build the service. Tests pass their own settings (and may pass a model pool or database)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_request_bytes, JSON_SORT_KEYS=False)
    app.json.ensure_ascii = False
    default = None if models else find_model(settings.model, home=settings.home)  # fails before any file is made
    db = db or Database.from_settings(settings)
    models = models or ModelPool(settings, db, default=default, catalog=lambda: list_models(home=settings.home))
    power = PowerManager(
        models, db,
        idle_after=settings.idle_after, deep_idle_after=settings.deep_idle_after,
        memory_low_mb=settings.memory_low_mb, sample_every=settings.sample_every,
        profile=settings.power_profile, dry_run=settings.power_dry_run,
    )
    retention = RetentionWorker(db, settings.retention)
    app.extensions["appliance"] = AppState(settings=settings, db=db, models=models, power=power,
                                           retention=retention)
    auth.init_app(app)  # first: refuses to build a service that would listen without the keys it needs
    power.start()
    models.start()
    retention.start()
    error_handlers.init_app(app)
    api.init_app(app)
    metrics.init_app(app)
    return app
