"""Prometheus metrics at /metrics, one registry per app (never prometheus_client's global one).

Two kinds of figures:

- events, counted when they happen: one logged request (the same moment its row in the
  ``requests`` table is finished, so the counters match the table), its latency, time to first
  token, tokens and decode speed; model loads and their duration; requests refused because the
  log could not be written;
- state, read at scrape time: queue depth, busy slots, batch size, power state, the runner's
  load and crash counts, whether the log is writable.

README.md, "Metrics", documents every name. /metrics is not logged. It lives in its own
blueprint, ``metrics``, so access control can be set on that blueprint alone.
"""

from __future__ import annotations

import psutil
from flask import Blueprint, Flask, Response, current_app
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from appliance.api.error_handlers import error_response
from appliance.errors import LogUnavailable
from appliance.history import RequestHistory
from appliance.power import STATES, tree_rss
from appliance.request import LoggedRequest

bp = Blueprint("metrics", __name__)

# Seconds, from 10 ms (a refused request, a warm first token) to 60 s (a long answer on a small box).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
NO_ROLE = "none"  # the role label of a request made without an API key


class Metrics:
    """The app's registry and its event metrics; the state gauges come from ``_StateCollector`` at scrape time."""

    def __init__(self, app_state):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("appliance_requests", "Logged API requests (rows of the requests table), by how they ended",
                                ["endpoint", "status", "model", "role"], registry=r)
        self.latency = Histogram("appliance_request_duration_seconds", "Arrival to end of each logged API request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("appliance_time_to_first_token_seconds",
                              "Arrival to first generated text (queue and prefill included)", ["endpoint"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens of generations", ["model"], registry=r)
        self.completion_tokens = Counter("appliance_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.tokens_per_s = Histogram("appliance_decode_tokens_per_second",
                                      "Decode speed of each generation of more than one token", ["model"],
                                      buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.load_duration = Histogram("appliance_model_load_duration_seconds",
                                       "Verify files, start the runner and load the model", ["model"],
                                       buckets=LOAD_BUCKETS, registry=r)
        self.log_refusals = Counter("appliance_log_unavailable_refusals",
                                    "Requests refused with 503 log_unavailable: the request log could not be written",
                                    registry=r)
        r.register(_StateCollector(app_state))

    # -- events -----------------------------------------------------------------------------
    def request_finished(self, logged: LoggedRequest) -> None:
        """Count a logged request the moment its row is finished, with its generation's figures if it had one."""
        endpoint = logged.endpoint
        self.requests.labels(endpoint, str(logged.status), logged.model or "", logged.role or NO_ROLE).inc()
        self.latency.labels(endpoint).observe(logged.seconds)
        generation = logged.generation
        if generation is None:
            return
        if generation.ttft_ms is not None:
            self.ttft.labels(endpoint).observe(generation.ttft_ms / 1000)
        self.prompt_tokens.labels(logged.model).inc(generation.usage.prompt_tokens or 0)
        self.completion_tokens.labels(logged.model).inc(generation.usage.completion_tokens or 0)
        if generation.tokens_per_s is not None:
            self.tokens_per_s.labels(logged.model).observe(generation.tokens_per_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges and counters whose truth lives elsewhere (the queue, the runner, the power manager, the log)."""

    def __init__(self, app_state):
        self.st = app_state

    def describe(self):
        return []  # read at scrape time only: nothing to check at registration

    def collect(self):
        st = self.st
        models = st.models.known()
        yield from _per_model(models, "appliance_slots", "Slots: requests that may generate at once",
                              lambda m: m.admission.slots)
        yield from _per_model(models, "appliance_busy_slots", "Slots held by a running request",
                              lambda m: m.admission.stats()["busy_slots"])
        yield from _per_model(models, "appliance_queue_size", "Requests that may wait for a slot",
                              lambda m: m.admission.queue_size)
        depth = GaugeMetricFamily("appliance_queue_depth", "Requests waiting for a slot, by model and priority class",
                                  labels=["model", "priority_class"])
        expected = GaugeMetricFamily("appliance_expected_wait_seconds",
                                     "Expected wait for a slot of a request arriving now, by model and priority class "
                                     "(the queue ahead at the measured throughput)", labels=["model", "priority_class"])
        for model in models:
            stats = model.admission.stats()
            for name, count in stats["queued_by_class"].items():
                depth.add_metric([model.name, name], count)
            for name, seconds in stats["expected_wait_s"].items():
                expected.add_metric([model.name, name], seconds)
        yield depth
        yield expected
        yield from _per_model(models, "appliance_batch_size", "Sequences in the runner's last batched decode step",
                              lambda m: m.runner.last_batch_size)
        yield from _per_model(models, "appliance_runner_streams",
                              "Requests the runner holds now (generating or prefilling)", lambda m: m.runner.busy_slots)
        yield from _per_model(models, "appliance_model_loaded", "1 while the model's runner is up",
                              lambda m: int(m.runner.is_loaded))
        yield from _per_model(models, "appliance_model_memory_estimate_bytes",
                              "What the pool counts for a loaded model: its files plus its KV cache",
                              lambda m: m.memory_mib * 2**20 if m.runner.is_loaded else 0)
        yield from _per_model(models, "appliance_model_loads", "Successful model loads (first load, wakes, restarts)",
                              lambda m: m.runner.load_count, CounterMetricFamily)
        yield from _per_model(models, "appliance_runner_crashes", "Runner processes that died unplanned",
                              lambda m: m.runner.crash_count, CounterMetricFamily)
        events = CounterMetricFamily("appliance_model_events", "Rows of model_events: loads, unloads, evictions, "
                                     "expiries, failed loads", labels=["event", "model", "outcome"])
        for event, model, outcome, count in st.db.model_event_counts():
            events.add_metric([event, model, outcome], count)
        yield events
        power = GaugeMetricFamily("appliance_power_state", "1 for the current power state, 0 for the others",
                                  labels=["state"])
        for name in STATES:
            power.add_metric([name], int(st.power.state == name))
        yield power
        if st.power.last_wake_ms is not None:
            yield _gauge("appliance_last_wake_seconds", "How long the last wake from idle or deep idle took",
                         st.power.last_wake_ms / 1000)
        yield _gauge("appliance_log_writable", "0 while writes to the request log fail (disk full or failing)",
                     int(st.db.log_error is None))
        # The box's memory, read at scrape time, for the dashboard and the "memory over 85%" alert (deploy/).
        memory = psutil.virtual_memory()
        yield _gauge("appliance_memory_total_bytes", "The box's physical memory", memory.total)
        yield _gauge("appliance_memory_available_bytes", "Memory the box can give without swapping", memory.available)
        yield _gauge("appliance_resident_memory_bytes", "Resident memory of the service and its runner processes",
                     tree_rss(psutil.Process()))
        yield from _devices([m for m in models if m.runner.is_loaded and m.runner.facts is not None])


def _devices(models):
    """Where each loaded model runs and how many of its layers are on a GPU, as its engine reported at load."""
    device = GaugeMetricFamily("appliance_model_device", "1 for the device a loaded model's layers mostly run on "
                               "(llama.cpp's CPU or CUDA0; ONNX Runtime's execution provider)", labels=["model", "device"])
    for model in models:
        info = model.runner.facts.info
        device.add_metric([model.name, str(info.get("device") or info.get("provider"))], 1)
    yield device
    yield from _per_model(models, "appliance_model_gpu_layers", "Layers of a loaded model on a GPU, as llama.cpp "
                          "reported them at load", lambda m: m.runner.facts.info.get("gpu_layers_offloaded") or 0)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _per_model(models, name: str, documentation: str, value, family=GaugeMetricFamily):
    metric = family(name, documentation, labels=["model"])
    for model in models:
        metric.add_metric([model.name], value(model))
    yield metric


def _log_unavailable(error: LogUnavailable):
    current_app.extensions["metrics"].log_refusals.inc()
    return error_response(error)


@bp.get("/metrics")
def metrics_endpoint():
    """Prometheus text exposition format (0.0.4)."""
    return Response(current_app.extensions["metrics"].exposition(), mimetype=None,
                    headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def init_app(app: Flask) -> None:
    """After error_handlers.init_app and api.init_app: needs the app's state; adds the route, the counters' hooks."""
    metrics = Metrics(app.extensions["appliance"])
    app.extensions["metrics"] = metrics
    app.extensions["appliance"].models.on_load.append(
        lambda name, seconds: metrics.load_duration.labels(name).observe(seconds))
    app.extensions["appliance"].request_observers.append(metrics.request_finished)
    history = RequestHistory()  # the last hour by minute, for the web UI's charts (GET /api/status/history)
    app.extensions["history"] = history
    app.extensions["appliance"].request_observers.append(history.observe)
    app.register_error_handler(LogUnavailable, _log_unavailable)
    app.register_blueprint(bp)
