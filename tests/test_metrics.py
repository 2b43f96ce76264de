"""/metrics (fast tier): Prometheus text that prometheus_client's own parser reads, whose counters and
histogram counts match the rows of the request table after a burst of 200s, 400s, 404s and a 429."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.errors import LogUnavailable
from tests.helpers import CHAT, COMPLETIONS, bearer, chat_body, create_key


def scrape(box) -> dict[str, list]:
    """Samples by metric family name, each (sample name, labels, value)."""
    r = box.client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    families = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        families[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return families


def value(families, family: str, sample: str | None = None, **labels) -> float:
    """The sum of a family's samples named ``sample`` (default: the family's own) whose labels include ``labels``."""
    name = sample or family
    return sum(v for n, ls, v in families[family] if n == name and labels.items() <= ls.items())


def burst(box) -> None:
    for _ in range(3):
        assert box.client.post(CHAT, json=chat_body(max_tokens=8)).status_code == 200
    stream = box.client.post(CHAT, json=chat_body(stream=True))
    stream.get_data()
    stream.close()
    assert box.client.post(COMPLETIONS, json={"prompt": "Once"}).status_code == 200
    assert box.client.post(CHAT, json=chat_body(temperature=5)).status_code == 400  # refused by the schema
    assert box.client.post(CHAT, json=chat_body(max_tokens=1000)).status_code == 400  # by the runner's context check
    assert box.client.post(COMPLETIONS, data=b"{", content_type="application/json").status_code == 400
    assert box.client.post(CHAT, json=chat_body(model="gpt-4")).status_code == 404
    assert box.client.post(CHAT, json=chat_body()).status_code == 429  # the bucket is empty now
    box.client.get("/v1/models")  # not logged, not counted
    box.client.get("/api/status")


def test_metrics_parse_and_match_the_request_table(make_box):
    box = make_box(rate_limit_rpm=6)  # the 6 requests that reach the queue take them all
    burst(box)
    rows = box.rows()
    families = scrape(box)

    by_row = Counter((r["endpoint"], str(r["status"]), r["model"] or "") for r in rows)
    counted = Counter({(ls["endpoint"], ls["status"], ls["model"]): v for n, ls, v in families["appliance_requests"]
                       if n == "appliance_requests_total"})
    assert counted == by_row
    assert {"200", "400", "404", "429"} <= {status for _, status, _ in by_row}
    assert all(ls["role"] == "none" for _, ls, _ in families["appliance_requests"])

    for endpoint in (CHAT, COMPLETIONS):
        mine = [r for r in rows if r["endpoint"] == endpoint]
        count = value(families, "appliance_request_duration_seconds", "appliance_request_duration_seconds_count",
                      endpoint=endpoint)
        assert count == len(mine)
        ttft = value(families, "appliance_time_to_first_token_seconds", "appliance_time_to_first_token_seconds_count",
                     endpoint=endpoint)
        assert ttft == sum(r["ttft_ms"] is not None for r in mine)
        total_s = value(families, "appliance_request_duration_seconds", "appliance_request_duration_seconds_sum",
                        endpoint=endpoint)
        assert total_s == pytest.approx(sum(r["total_ms"] for r in mine) / 1000, rel=0.05, abs=0.05)
    assert value(families, "appliance_prompt_tokens", "appliance_prompt_tokens_total") == \
        sum(r["prompt_tokens"] or 0 for r in rows)
    assert value(families, "appliance_completion_tokens", "appliance_completion_tokens_total") == \
        sum(r["completion_tokens"] or 0 for r in rows)
    assert value(families, "appliance_decode_tokens_per_second", "appliance_decode_tokens_per_second_count") == \
        sum(r["tokens_per_s"] is not None for r in rows)


def test_state_gauges_at_scrape_time(make_box):
    box = make_box()
    families = scrape(box)
    assert value(families, "appliance_slots") == 2 and value(families, "appliance_queue_size") == 4
    assert value(families, "appliance_busy_slots") == 0 and value(families, "appliance_queue_depth") == 0
    assert {ls["priority_class"] for _, ls, _ in families["appliance_queue_depth"]} == {"interactive", "default", "batch"}
    assert value(families, "appliance_model_loads", "appliance_model_loads_total") == 1
    assert value(families, "appliance_model_load_duration_seconds", "appliance_model_load_duration_seconds_count") == 1
    assert value(families, "appliance_runner_crashes", "appliance_runner_crashes_total") == 0
    assert value(families, "appliance_power_state", state="active") == 1
    assert value(families, "appliance_power_state") == 1  # exactly one state at a time
    assert value(families, "appliance_log_writable") == 1

    holder = box.client.post(CHAT, json=chat_body(stream=True))  # holds a slot until read
    assert value(scrape(box), "appliance_busy_slots") == 1
    holder.get_data()
    holder.close()
    assert value(scrape(box), "appliance_batch_size") >= 1

    box.client.post("/api/power", json={"state": "deep_idle"})
    families = scrape(box)
    assert value(families, "appliance_power_state", state="deep_idle") == 1
    assert value(families, "appliance_model_loaded") == 0
    assert box.client.post(CHAT, json=chat_body()).status_code == 200  # wakes: a second load
    families = scrape(box)
    assert value(families, "appliance_model_loads", "appliance_model_loads_total") == 2
    assert value(families, "appliance_model_load_duration_seconds", "appliance_model_load_duration_seconds_count") == 2
    assert value(families, "appliance_last_wake_seconds") > 0


def test_log_write_failures(make_box, monkeypatch):
    box = make_box()

    def full(*args, **kwargs):
        box.db.log_error = "database or disk is full"
        raise LogUnavailable(box.db.path, "database or disk is full")

    monkeypatch.setattr(box.db, "start_request", full)
    assert box.client.post(CHAT, json=chat_body()).status_code == 503
    assert box.client.post(COMPLETIONS, json={"prompt": "x"}).status_code == 503
    families = scrape(box)
    assert value(families, "appliance_log_unavailable_refusals", "appliance_log_unavailable_refusals_total") == 2
    assert value(families, "appliance_log_writable") == 0
    monkeypatch.undo()
    box.db.log_error = None


def test_metrics_are_not_logged_and_registries_are_per_app(make_box):
    first, second = make_box(), make_box()
    first.client.post(CHAT, json=chat_body())
    for _ in range(3):
        first.client.get("/metrics")
    assert [r["endpoint"] for r in first.rows()] == [CHAT]
    assert value(scrape(first), "appliance_requests", "appliance_requests_total") == 1
    assert value(scrape(second), "appliance_requests", "appliance_requests_total") == 0


def test_requests_are_counted_by_the_role_of_their_key_and_metrics_need_admin_or_auditor(make_box):

    box = make_box()
    keys = {role: create_key(box.settings.home, role) for role in ("user", "admin", "auditor")}
    assert box.client.post(CHAT, json=chat_body(), headers=bearer(keys["user"])).status_code == 200
    assert box.client.post(CHAT, json=chat_body(), headers=bearer(keys["admin"])).status_code == 200
    assert box.client.get("/metrics").status_code == 401
    assert box.client.get("/metrics", headers=bearer(keys["user"])).status_code == 403
    assert box.client.get("/metrics", headers=bearer(keys["admin"])).status_code == 200
    r = box.client.get("/metrics", headers=bearer(keys["auditor"]))
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    roles = Counter({s.labels["role"]: s.value for s in families["appliance_requests"].samples
                     if s.name == "appliance_requests_total"})
    assert roles == Counter({"user": 1, "admin": 1})
