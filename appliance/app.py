"""The Flask application factory."""

from __future__ import annotations

from flask import Flask

from appliance import api, auth, metrics
from appliance.admission import Admission
from appliance.api import error_handlers
from appliance.audit.retention import RetentionWorker
from appliance.config import Settings, load_settings
from appliance.db import Database
from appliance.power import PowerManager
from appliance.runner.supervisor import ModelRunner
from appliance.state import AppState
from models import find_model


def create_app(settings: Settings | None = None, runner: ModelRunner | None = None, db: Database | None = None) -> Flask:
    """Build the service. Tests pass their own settings (and may pass a runner or database)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_request_bytes, JSON_SORT_KEYS=False)
    app.json.ensure_ascii = False
    if runner is None:
        runner = ModelRunner(
            find_model(settings.model, home=settings.home), threads=settings.threads,
            context_length=settings.context_length, parallel=settings.parallel, provider=settings.provider,
            stream_interval=settings.stream_interval,
        )
    db = db or Database.from_settings(settings)
    power = PowerManager(
        runner, db,
        idle_after=settings.idle_after, deep_idle_after=settings.deep_idle_after,
        memory_low_mb=settings.memory_low_mb, sample_every=settings.sample_every,
        profile=settings.power_profile, dry_run=settings.power_dry_run,
    )
    admission = Admission(
        slots=settings.parallel, queue_size=settings.queue_size, classes=settings.priority_classes,
        aging=settings.queue_aging, requests_per_minute=settings.rate_limit_rpm,
        tokens_per_minute=settings.rate_limit_tpm,
    )
    retention = RetentionWorker(db, settings.retention)
    app.extensions["appliance"] = AppState(settings=settings, db=db, runner=runner, power=power, admission=admission,
                                           retention=retention)
    auth.init_app(app)  # first: refuses to build a service that would listen without the keys it needs
    power.start()
    retention.start()
    error_handlers.init_app(app)
    api.init_app(app)
    metrics.init_app(app)
    return app
