"""What the web UI needs from the admin API, on the fast tier's box: log filters, one row, CSV and JSON Lines
export (and the CLI's), the page and its files, and the deploy/ monitoring files against /metrics."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appliance.cli import cli
from appliance.history import RequestHistory
from installer import vendor_js
from tests.helpers import CHAT, assert_openai_error, chat_body

ROOT = Path(__file__).resolve().parent.parent


def _fill(box) -> None:
    box.client.post(CHAT, json=chat_body("the pump is red"))
    box.client.post(CHAT, json=chat_body("=HYPERLINK(\"http://x\")"))
    box.client.post(CHAT, json=chat_body("100%_done"))
    box.client.post(CHAT, json={"messages": []})  # a 400


def _ids(response) -> list[int]:
    assert response.status_code == 200, response.get_data(as_text=True)
    return [r["id"] for r in response.get_json()["data"]]


def test_logs_filter_by_status_text_model_and_time(box):
    _fill(box)
    c = box.client
    assert _ids(c.get("/api/logs")) == [4, 3, 2, 1]
    assert _ids(c.get("/api/logs?status=error")) == [4]
    assert _ids(c.get("/api/logs?status=400")) == [4]
    assert _ids(c.get("/api/logs?status=ok")) == [3, 2, 1]
    assert _ids(c.get("/api/logs?q=PUMP")) == [1]  # case-insensitive
    assert _ids(c.get("/api/logs?q=100%25_")) == [3]  # % and _ are the text's own, not wildcards
    assert _ids(c.get("/api/logs?q=0%25_d")) == [3]
    assert _ids(c.get("/api/logs?q=%25")) == [3]
    assert _ids(c.get("/api/logs?model=fake&status=ok")) == [3, 2, 1]
    assert _ids(c.get("/api/logs?model=other")) == []
    assert _ids(c.get("/api/logs?endpoint=/v1/chat/completions")) == [4, 3, 2, 1]
    started = box.rows()[1]["started"]
    assert _ids(c.get("/api/logs", query_string={"since": started})) == [4, 3, 2]
    assert _ids(c.get("/api/logs", query_string={"until": started})) == [1]
    assert _ids(c.get("/api/logs?since=2000-01-01")) == [4, 3, 2, 1]
    assert _ids(c.get("/api/logs?since=2999-01-01T00:00%2B02:00")) == []
    page = c.get("/api/logs?limit=2").get_json()
    assert [r["id"] for r in page["data"]] == [4, 3] and page["has_more"] is True
    page = c.get("/api/logs?limit=2&offset=2").get_json()
    assert [r["id"] for r in page["data"]] == [2, 1] and page["has_more"] is False
    assert "prompt" not in page["data"][0]


def test_logs_filter_by_the_priority_class_a_request_ran_in(box):
    c = box.client
    c.post(CHAT, json=chat_body("now"), headers={"X-Priority": "interactive"})
    c.post(CHAT, json=chat_body("later") | {"priority": "batch"})
    c.post(CHAT, json=chat_body("whenever"))
    c.post(CHAT, json=chat_body("?"), headers={"X-Priority": "nope"})  # a 400: it never ran in a class
    assert [r["priority"] for r in box.rows()] == ["interactive", "batch", "default", None]
    assert _ids(c.get("/api/logs?priority=batch")) == [2]
    assert _ids(c.get("/api/logs?priority=default")) == [3]
    lines = c.get("/api/logs/export?format=jsonl&priority=interactive").get_data(as_text=True).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1]


def test_bad_log_filters_are_400s_that_name_them(box):
    assert_openai_error(box.client.get("/api/logs?status=teapot"), 400, "invalid_value", "status")
    assert_openai_error(box.client.get("/api/logs?since=yesterday"), 400, "invalid_value", "since")
    assert_openai_error(box.client.get("/api/logs/export?format=xml"), 400, "invalid_value", "format")


def test_one_row_with_and_without_its_texts(box):
    _fill(box)
    row = box.client.get("/api/logs/1").get_json()
    assert row["id"] == 1 and "prompt" not in row
    assert "the pump is red" in box.client.get("/api/logs/1?text=true").get_json()["prompt"]
    assert_openai_error(box.client.get("/api/logs/99"), 404, "not_found")


def test_export_csv_and_jsonl_hold_the_filtered_rows(box):
    _fill(box)
    r = box.client.get("/api/logs/export?format=csv&status=ok&text=true")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert [int(row["id"]) for row in rows] == [3, 2, 1]
    assert rows[0]["status"] == "200" and rows[0]["model"] == "fake"
    formula = next(row for row in rows if row["id"] == "2")["prompt"]
    assert not formula.startswith("=") and not formula.startswith("{\"messages\": [{\"role\": \"user\", \"content\": \"=")
    r = box.client.get("/api/logs/export?format=jsonl&q=pump")
    assert r.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    assert [line["id"] for line in lines] == [1]
    assert "prompt" not in lines[0] and lines[0]["prompt_sha256"]
    empty = box.client.get("/api/logs/export?format=csv&model=none").get_data(as_text=True)
    assert empty.strip().startswith("id,seq,started") and len(empty.strip().splitlines()) == 1


def test_export_walks_past_one_batch(box):
    for i in range(7):
        box.client.post(CHAT, json=chat_body(f"n{i}"))
    rows = list(box.db.iter_requests(batch=3))
    assert [r["id"] for r in rows] == [7, 6, 5, 4, 3, 2, 1]


def test_logs_export_command_writes_jsonl_and_csv(box, tmp_path):
    _fill(box)
    out = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(cli, ["logs", "export", "--home", str(box.settings.home), "--since", "2000-01-01",
                                      "--format", "jsonl", "--out", str(out), "--text"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [4, 3, 2, 1] and "pump" in lines[3]["prompt"]
    result = CliRunner().invoke(cli, ["logs", "export", "--home", str(box.settings.home), "--status", "error",
                                      "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in csv.DictReader(io.StringIO(result.stdout))] == ["4"]
    result = CliRunner().invoke(cli, ["logs", "export", "--home", str(box.settings.home), "--since", "soon"])
    assert result.exit_code == 2 and "--since" in result.output


def test_the_page_and_its_files_are_served_with_the_policy(box):
    page = box.client.get("/")
    assert page.status_code == 200
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html and "<style" not in html
    for name in ("app.js", "app.css", "markdown.js"):
        assert box.client.get(f"/static/{name}").status_code == 200, name


# -- deploy/: the Grafana dashboard and Prometheus rules a site imports ---------------------------------------
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bappliance_[a-z_]+\b")


def _metric_names(box) -> set[str]:
    box.client.post(CHAT, json=chat_body("hi"))
    for power in ("deep_idle", "active"):  # a wake, so that appliance_last_wake_seconds is there
        assert box.client.post("/api/power", json={"state": power}).status_code == 200
    box.client.post(CHAT, json=chat_body("hi again"))
    text = box.client.get("/metrics").get_data(as_text=True)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_in_the_dashboard_and_rules_is_served(box):
    served = _metric_names(box)
    dashboard = json.loads((DEPLOY / "grafana" / "edge-appliance.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = set(METRIC.findall(" ".join(exprs))) | set(METRIC.findall(rules))
    assert {"appliance_request_duration_seconds_bucket", "appliance_memory_available_bytes",
            "appliance_log_writable", "appliance_model_events_total"} <= used
    assert not used - served, f"not in /metrics: {sorted(used - served)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_alert_rules_hold_the_seeds_thresholds():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert "> 0.5" in by_name["ApplianceLatencyP99High"]["expr"] and by_name["ApplianceLatencyP99High"]["for"] == "5m"
    assert "> 0.02" in by_name["ApplianceErrorRateHigh"]["expr"]
    assert "[24h]" in by_name["ApplianceRunnerRestarts"]["expr"] and "> 3" in by_name["ApplianceRunnerRestarts"]["expr"]
    assert "> 0.85" in by_name["ApplianceMemoryHigh"]["expr"] and by_name["ApplianceMemoryHigh"]["for"] == "5m"
    assert "appliance_log_writable == 0" in by_name["ApplianceLogWritesFailing"]["expr"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_accepts_the_alert_rules():
    result = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


# -- the status charts' hour in memory -------------------------------------------------------------------------
def test_history_buckets_requests_by_minute_and_forgets_the_hour_before():
    now = [600_000.0]
    history = RequestHistory(minutes=3, clock=lambda: now[0])
    history.add(200, 0.1, ttft_ms=50, tokens_per_s=20)
    history.add(200, 0.3, ttft_ms=150, tokens_per_s=40)
    history.add(503, 0.2)
    now[0] += 60
    series = history.series()
    assert series["time"] == [599_940, 600_000, 600_060]
    assert series["requests"] == [0, 3, 0] and series["errors"] == [0, 1, 0]
    assert series["latency_p50_s"][1] == 0.2 and series["latency_p95_s"][1] == 0.3
    assert series["ttft_p50_s"][1] == 0.15 and series["tokens_per_s_p50"][1] == 40
    assert series["latency_p50_s"][0] is None
    now[0] += 600
    history.add(200, 0.5)
    assert history.series()["requests"] == [0, 0, 1] and len(history._buckets) == 1


def test_history_endpoint_counts_the_box_requests(box):
    box.client.post(CHAT, json=chat_body("one"))
    box.client.post(CHAT, json=chat_body("two"))
    series = box.client.get("/api/status/history").get_json()
    assert len(series["time"]) == 60 and series["requests"][-1] == 2
    assert series["latency_p50_s"][-1] > 0 and series["ttft_p50_s"][-1] > 0


# -- vendored JavaScript ------------------------------------------------------------------------------------
def test_vendored_files_match_their_manifest():
    assert vendor_js.check() == []
    manifest = json.loads(vendor_js.MANIFEST.read_text())
    for package in manifest["packages"]:
        assert package["version"][0].isdigit() and package["integrity"].startswith("sha512-")
        assert any(entry["path"].endswith("LICENSE") for entry in package["files"].values()), package["name"]


def test_a_changed_vendored_file_is_reported(tmp_path):
    vendor = tmp_path / "vendor"
    shutil.copytree(vendor_js.VENDOR, vendor)
    target = next(p for p in vendor.rglob("*.js"))
    target.write_text(target.read_text() + "\n// edited")
    (vendor / "stray.js").write_text("")
    problems = vendor_js.check(vendor)
    assert any("does not match" in p for p in problems) and any("stray.js" in p for p in problems)


def test_refresh_refuses_a_tarball_that_is_not_the_registry_s(tmp_path):
    vendor = tmp_path / "vendor"
    shutil.copytree(vendor_js.VENDOR, vendor)
    package = json.loads((vendor / "MANIFEST.json").read_text())["packages"][0]

    def fake_get(url):  # offline: the registry's answer, and a tarball that is not the one it names
        if url.endswith(".tgz"):
            return b"not the tarball"
        return json.dumps({"version": package["version"], "license": "MIT",
                           "dist": {"tarball": package["tarball"], "integrity": package["integrity"]}}).encode()

    with pytest.raises(SystemExit, match="does not match its integrity"):
        vendor_js.refresh(vendor, get=fake_get)


def test_verify_endpoint_reports_the_chain_and_an_edit(box):
    _fill(box)
    result = box.client.get("/api/logs/verify").get_json()
    assert result["ok"] is True and result["rows"] == 4 and result["problems"] == []
    box.db.db.execute("UPDATE requests SET status = 201 WHERE id = 2")  # behind the service's back
    box.db.db.commit()
    result = box.client.get("/api/logs/verify").get_json()
    assert result["ok"] is False and any("seq 2" in p or "id 2" in p for p in result["problems"]), result


# -- keys over the admin API (the Keys page) --------------------------------------------------------------------
def _refused(response) -> tuple[int, str]:
    return response.status_code, response.get_json()["error"]["code"]


def test_keys_are_created_once_listed_without_secrets_and_revoked(box):
    c = box.client
    r = c.post("/api/keys", json={"role": "admin", "name": "ops"})
    assert r.status_code == 201, r.get_data(as_text=True)
    admin = r.get_json()
    assert admin["key"].startswith("sk-") and admin["role"] == "admin"
    row = box.last_row()
    assert row["endpoint"] == "/api/keys" and admin["key"] not in (row["prompt"] or "") + (row["response"] or "")
    # Keys now exist, so loopback needs one too.
    assert _refused(c.get("/api/keys")) == (401, "missing_api_key")
    headers = {"Authorization": f"Bearer {admin['key']}"}
    user = c.post("/api/keys", json={"role": "user", "name": "kiosk", "expires": "2099-01-31", "priority": "batch",
                                     "rpm": 10}, headers=headers).get_json()
    listed = {k["id"]: k for k in c.get("/api/keys", headers=headers).get_json()["data"]}
    assert set(listed) == {admin["id"], user["id"]}
    assert listed[user["id"]]["state"] == "active" and listed[user["id"]]["priority"] == "batch"
    assert not any("hash" in k or "salt" in k or "key" in k for k in listed.values())
    assert _refused(c.get("/api/keys", headers={"Authorization": f"Bearer {user['key']}"})) == (403, "wrong_role")
    assert c.post(f"/api/keys/{user['id']}/revoke", json={}, headers=headers).get_json()["revoked"] is True
    assert _refused(c.get("/v1/models", headers={"Authorization": f"Bearer {user['key']}"}))[0] == 401
    assert_openai_error(c.post(f"/api/keys/{user['id']}/revoke", json={}, headers=headers), 404, "not_found")
    assert_openai_error(c.post("/api/keys", json={"role": "root"}, headers=headers), 400, param="role")
    assert_openai_error(c.post("/api/keys", json={"role": "user", "priority": "vip"}, headers=headers), 400,
                        param="priority")
    assert_openai_error(c.post("/api/keys", json={"role": "user", "expires": "soon"}, headers=headers), 400,
                        param="expires")


def test_models_verify_endpoint_answers_per_model(box):
    r = box.client.get("/api/models/verify")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert isinstance(body["data"], list) and isinstance(body["ok"], bool)
    for result in body["data"]:
        assert set(result) == {"name", "ok", "available", "detail"}


def test_status_says_how_long_the_service_has_been_up(box):
    uptime = box.client.get("/api/status").get_json()["uptime_s"]
    assert 0 <= uptime < 24 * 3600
