"""API keys, roles and the browser-safety checks (issue 14).

Fast tier: the real app on the fake engine with Flask's test client (as in test_http_fast.py), keys
made by the real ``appliance keys`` command. One slow test proves it on a real ``appliance serve``
listening beyond loopback, with the real model and the real openai client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from tests.helpers import CHAT, COMPLETIONS, bearer, chat, chat_body, create_key, key_id, needs_bundled_model, start_service, wait_for


def assert_error(response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["code"]) == (type_, code), body
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture
def keyed(make_box):
    """A loopback box (auth = auto) once keys exist: one key of each role."""
    box = make_box()
    home = box.settings.home
    box.keys = {role: create_key(home, role) for role in ("user", "admin", "auditor")}
    return box


# -- 401 and 403 ---------------------------------------------------------------------------------
def test_no_key_or_a_bad_key_is_401_once_keys_exist(keyed):
    r = keyed.client.post(CHAT, json=chat_body())
    assert_error(r, 401, "authentication_error", "missing_api_key")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    user = keyed.keys["user"]
    for wrong in (user[:-2] + "xx", "sk-nothere-secret", "not-needed", user.replace("sk-", "")):
        assert_error(keyed.client.post(CHAT, json=chat_body(), headers=bearer(wrong)), 401,
                     "authentication_error", "invalid_api_key")
    assert_error(keyed.client.get("/api/logs"), 401, "authentication_error", "missing_api_key")
    # Refused before a row: an unauthenticated flood cannot fill the log (the rows are the three keys made).
    assert [r["endpoint"] for r in keyed.rows()] == ["cli:keys create"] * 3
    r = keyed.client.post(CHAT, json=chat_body(), headers=bearer(user))
    assert r.status_code == 200
    assert keyed.last_row()["key_id"] == key_id(user)


@pytest.mark.parametrize("role, method, path, allowed", [
    ("user", "post", CHAT, True),
    ("user", "get", "/v1/models", True),
    ("user", "get", "/api/logs", False),
    ("user", "get", "/api/status", False),
    ("user", "post", "/api/power", False),
    ("user", "get", "/api/settings", False),  # it names the config file: a path, for admins only
    ("admin", "post", CHAT, True),
    ("admin", "get", "/api/logs", True),
    ("admin", "get", "/api/status", True),
    ("admin", "post", "/api/power", True),
    ("admin", "get", "/api/settings", True),
    ("auditor", "get", "/api/logs", True),
    ("auditor", "post", CHAT, False),
    ("auditor", "get", "/v1/models", False),
    ("auditor", "get", "/api/status", False),
    ("auditor", "post", "/api/power", False),
    ("auditor", "get", "/api/settings", False),
])
def test_roles(keyed, role, method, path, allowed):
    body = {"state": "active"} if path == "/api/power" else chat_body() if method == "post" else None
    r = getattr(keyed.client, method)(path, json=body, headers=bearer(keyed.keys[role]))
    if allowed:
        assert r.status_code == 200, r.get_data(as_text=True)
    else:
        error = assert_error(r, 403, "permission_error", "wrong_role")
        assert role in error["message"] and path in error["message"]


def test_health_probes_and_the_ui_page_stay_open(keyed):
    assert keyed.client.get("/healthz").status_code == 200
    assert keyed.client.get("/readyz").status_code == 200
    assert keyed.client.get("/").status_code == 200
    assert keyed.client.get("/static/app.js").status_code == 200


def test_expired_and_revoked_keys_are_401(keyed):
    home = keyed.settings.home
    old = create_key(home, "user", "--expires", "2020-01-01")
    assert_error(keyed.client.get("/v1/models", headers=bearer(old)), 401, "authentication_error", "expired_api_key")
    user = keyed.keys["user"]
    assert keyed.client.get("/v1/models", headers=bearer(user)).status_code == 200  # verified once, then cached
    result = CliRunner().invoke(cli, ["keys", "revoke", key_id(user), "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert_error(keyed.client.get("/v1/models", headers=bearer(user)), 401, "authentication_error", "revoked_api_key")
    listed = CliRunner().invoke(cli, ["keys", "list", "--json", "--home", str(home)])
    states = {row["id"]: row["state"] for row in json.loads(listed.stdout)}
    assert states[key_id(user)] == "revoked" and states[key_id(old)] == "expired"
    assert states[key_id(keyed.keys["admin"])] == "active"
    assert "sk-" not in listed.stdout and "hash" not in listed.stdout
    revoked = [r for r in keyed.rows() if r["endpoint"] == "cli:keys revoke"]
    assert [r["key_id"] for r in revoked] == [key_id(user)] and revoked[0]["client"].endswith("(terminal)")


def test_auth_off_serves_without_a_key_but_still_names_the_key(make_box):
    box = make_box(auth="off")
    user = create_key(box.settings.home, "user")
    assert box.client.post(CHAT, json=chat_body()).status_code == 200
    assert box.client.post(CHAT, json=chat_body(), headers=bearer("garbage")).status_code == 200
    assert box.client.post(CHAT, json=chat_body(), headers=bearer(user)).status_code == 200
    assert [(r["endpoint"], r["key_id"]) for r in box.rows()] == [
        ("cli:keys create", key_id(user)), (CHAT, None), (CHAT, None), (CHAT, key_id(user))]


# -- listening beyond loopback --------------------------------------------------------------------
@needs_bundled_model
def test_serve_refuses_a_non_loopback_host_without_an_admin_key(tmp_path):
    env = {"APPLIANCE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "appliance", "serve", "--host", "0.0.0.0", "--port", "1"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "appliance keys create --role admin" in run.stderr and "0.0.0.0" in run.stderr
    create_key(tmp_path / "home", "user")  # a user key does not make the box manageable
    run = subprocess.run([sys.executable, "-m", "appliance", "serve", "--host", "192.168.7.7", "--port", "1"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "appliance keys create --role admin" in run.stderr


def test_a_non_loopback_app_needs_an_admin_key_and_then_requires_keys(tmp_path, make_box):
    from appliance.auth import AuthSetupError

    def build(name: str, **settings):
        from appliance.app import create_app
        from appliance.config import load_settings
        from appliance.db import Database
        from models.catalog import ModelEntry
        from tests.helpers import fake_pool

        settings = load_settings(overrides={"home": tmp_path / name, "power_profile": "none"} | settings, environ={})
        entry = ModelEntry(name="fake", format="fake", path=tmp_path / "unused.json")
        db = Database(settings.db_path)
        try:
            create_app(settings, models=fake_pool(settings, db, entry), db=db)
        finally:
            db.close()

    with pytest.raises(AuthSetupError, match="keys create --role admin"):
        build("a", host="0.0.0.0")
    with pytest.raises(AuthSetupError, match="required"):
        build("b", auth="required")  # on loopback too, when asked for
    make_box(auth="off", host="0.0.0.0")  # explicitly off (a reverse proxy authenticates): starts, with a warning
    site = tmp_path / "site"
    admin = create_key(site, "admin")
    box = make_box(host="0.0.0.0", home=site)
    assert_error(box.client.get("/v1/models"), 401, "authentication_error", "missing_api_key")
    assert box.client.get("/api/status", headers=bearer(admin)).status_code == 200


# -- browser safety -----------------------------------------------------------------------------
def test_post_bodies_must_be_json(make_box):
    box = make_box()
    r = box.client.post(CHAT, data=b'{"messages": [{"role": "user", "content": "hi"}]}', content_type="text/plain")
    error = assert_error(r, 415, "invalid_request_error", "unsupported_media_type")
    assert "application/json" in error["message"]
    r = box.client.post("/api/power", data={"state": "deep_idle"})  # an HTML form's urlencoded body
    assert_error(r, 415, "invalid_request_error", "unsupported_media_type")
    assert_error(box.client.post(COMPLETIONS, data=b"x"), 415, "invalid_request_error", "unsupported_media_type")
    assert box.state.power.state == "active"
    ok = box.client.post(CHAT, data=b'{"messages": [{"role": "user", "content": "hi"}]}',
                         content_type="application/json; charset=utf-8")
    assert ok.status_code == 200
    assert [r["status"] for r in box.rows()] == [200]


def test_a_text_plain_cross_site_post_is_refused(make_box):
    box = make_box()
    # What a page on another site can send without a preflight: text/plain, with its own Origin.
    r = box.client.post("/api/power", data=b'{"state": "deep_idle"}', content_type="text/plain",
                        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert_error(r, 403, "permission_error", "cross_origin")
    r = box.client.post("/api/power", json={"state": "deep_idle"}, headers={"Origin": "http://evil.example"})
    assert_error(r, 403, "permission_error", "cross_origin")
    r = box.client.post(CHAT, json=chat_body(), headers={"Origin": "http://localhost:9999"})  # another port
    assert_error(r, 403, "permission_error", "cross_origin")
    assert_error(box.client.post(CHAT, json=chat_body(), headers={"Origin": "null"}), 403, "permission_error",
                 "cross_origin")
    assert box.state.power.state == "active" and box.rows() == []
    # The UI's own calls: same origin, JSON.
    r = box.client.post("/api/power", json={"state": "idle"}, headers={"Origin": "http://localhost",
                                                                       "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and r.get_json()["state"] == "idle"


@pytest.mark.parametrize("host, allowed", [
    ("evil.example:8080", False),
    ("evil.example", False),
    ("127.0.0.1:8080", True),
    ("localhost:8080", True),
    ("[::1]:8080", True),
    ("192.168.1.20:8080", True),  # an address: rebinding needs a name
    ("appliance.lan:8080", True),  # in allowed_hosts
    ("box.site.example", True),  # a subdomain of '.site.example'
    ("site.example", True),  # and the name itself
    ("site.example.evil.example", False),
])
def test_the_host_header_must_name_this_box(make_box, host, allowed):
    box = make_box(allowed_hosts=["appliance.lan", ".site.example"])
    for method, path in (("get", "/api/logs"), ("get", "/"), ("post", CHAT)):
        r = getattr(box.client, method)(path, json=chat_body() if method == "post" else None, headers={"Host": host})
        if allowed:
            assert r.status_code == 200, (path, r.get_data(as_text=True))
        else:
            error = assert_error(r, 400, "invalid_request_error", "host_not_allowed")
            assert "allowed_hosts" in error["message"]
    assert box.client.get("/healthz", headers={"Host": host}).status_code == 200  # probes answer anyone


def test_allowed_hosts_from_the_environment():
    from appliance.config import load_settings

    settings = load_settings(environ={"APPLIANCE_ALLOWED_HOSTS": "a.lan, b.lan"})
    assert settings.allowed_hosts == ["a.lan", "b.lan"]
    assert load_settings(environ={"APPLIANCE_ALLOWED_HOSTS": '["c.lan"]'}).allowed_hosts == ["c.lan"]


class InlineCode(HTMLParser):
    """What default-src 'self' would block: <style>, style= and on...= attributes, <script> without src."""

    def __init__(self):
        super().__init__()
        self.found, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        self.found += [f"{tag} {name}" for name in names if name == "style" or name.startswith("on")]
        if tag == "style" or (tag == "script" and "src" not in names):
            self.found.append(tag)
        self.scripts += tag == "script"


def test_ui_pages_send_the_security_headers_and_have_no_inline_code(make_box):
    box = make_box()
    r = box.client.get("/")
    assert r.headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    inline = InlineCode()
    inline.feed(r.get_data(as_text=True))
    assert inline.found == [] and inline.scripts  # the CSP blocks inline code: the page has none
    assert box.client.get("/static/app.js").headers["X-Content-Type-Options"] == "nosniff"


# -- keys at rest ---------------------------------------------------------------------------------
def test_no_key_is_stored_in_clear(keyed):
    for role, key in keyed.keys.items():
        r = keyed.client.get("/api/logs", headers=bearer(key))
        assert r.status_code == (403 if role == "user" else 200)
    keyed.db.close()
    path = keyed.settings.db_path
    stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))  # the file, its WAL and shm
    assert b"api_keys" in stored
    for key in keyed.keys.values():
        secret = key.split("-", 2)[2]
        assert secret.encode() not in stored and key.encode() not in stored
        assert key_id(key).encode() in stored  # the public id is what is kept, beside the hash
    from appliance.db import Database

    keyed.db = Database(path)  # for the fixture's checks at the end
    rows = keyed.db.db.execute("select salt, scrypt_n, scrypt_r, scrypt_p, hash from api_keys").fetchall()
    assert len(rows) == 3 and all(len(bytes.fromhex(salt)) == 16 and n >= 2**14 for salt, n, *_ in rows)
    assert len({salt for salt, *_ in rows}) == 3


def test_an_older_log_upgrades_to_keys_and_keeps_its_rows(tmp_path):
    import sqlite_utils

    from appliance.db import Database
    from appliance.migrations import migrations

    path = tmp_path / "logs.db"
    old = sqlite_utils.Database(path)
    migrations.apply(old, stop_before="m003_api_keys")  # the log as the previous release left it
    old["requests"].insert({"started": "2026-11-01", "finished": "2026-11-01", "endpoint": "/v1/completions",
                            "status": 200})
    old.close()
    db = Database(path)
    try:
        (row,) = db.recent_requests()
        assert row["endpoint"] == "/v1/completions" and row["key_id"] is None
        assert db.api_keys() == [] and not db.has_api_keys()
    finally:
        db.close()


# -- keys and the queue ---------------------------------------------------------------------------
def test_a_keys_priority_class_and_id_reach_the_queue(make_box):
    box = make_box(rate_limit_rpm=1)
    batch = create_key(box.settings.home, "user", "--priority", "batch", "--name", "nightly")
    admitted = []
    admit = box.admission.admit
    box.admission.admit = lambda client, cls, limits, size=1: admitted.append((client, cls)) or admit(client, cls, limits, size)
    other = create_key(box.settings.home, "user")
    assert box.client.post(CHAT, json=chat_body(), headers=bearer(batch)).status_code == 200
    assert admitted[-1] == (f"key:{key_id(batch)}", "batch")
    # The bucket is the key's, not the address's: another key from the same address has its own.
    assert box.client.post(CHAT, json=chat_body(), headers=bearer(other)).status_code == 200
    assert admitted[-1] == (f"key:{key_id(other)}", None)
    assert_error(box.client.post(CHAT, json=chat_body(), headers=bearer(batch)), 429, "rate_limit_error",
                 "rate_limit_requests")
    # A key may not ask for a higher class than its own.
    error = assert_error(box.client.post(COMPLETIONS, json={"prompt": "x"}, headers=bearer(batch) | {
        "X-Priority": "interactive"}), 403, "permission_error", "priority_not_allowed")
    assert "'batch'" in error["message"]


def test_a_keys_own_limits_replace_the_services(make_box):
    box = make_box(rate_limit_rpm=1)
    generous = create_key(box.settings.home, "user", "--rpm", "3")
    unlimited = create_key(box.settings.home, "user", "--rpm", "0")
    plain = create_key(box.settings.home, "user")
    statuses = lambda key: [box.client.post(CHAT, json=chat_body(), headers=bearer(key)).status_code for _ in range(4)]
    assert statuses(generous) == [200, 200, 200, 429]
    assert statuses(unlimited) == [200, 200, 200, 200]
    assert statuses(plain) == [200, 429, 429, 429]
    error = box.client.post(CHAT, json=chat_body(), headers=bearer(generous)).get_json()["error"]
    assert error["message"].startswith("rate limit: 3 requests per minute")
    listed = CliRunner().invoke(cli, ["keys", "list", "--json", "--home", str(box.settings.home)])
    assert {(r["rpm"], r["tpm"]) for r in json.loads(listed.stdout)} == {(3, None), (0, None), (None, None)}


def test_a_metrics_key_reads_the_metrics_and_nothing_else(keyed):
    scrape = create_key(keyed.settings.home, "metrics", "--name", "prometheus")
    assert keyed.client.get("/metrics", headers=bearer(scrape)).status_code == 200
    for method, path in (("get", "/api/logs"), ("get", "/api/status"), ("get", "/v1/models"), ("post", CHAT)):
        r = getattr(keyed.client, method)(path, headers=bearer(scrape), json=chat_body())
        assert_error(r, 403, "permission_error", "wrong_role")


def test_logs_give_texts_only_when_asked(keyed):
    assert keyed.client.post(CHAT, json=chat_body(), headers=bearer(keyed.keys["user"])).status_code == 200
    for role in ("admin", "auditor"):
        plain = keyed.client.get("/api/logs", headers=bearer(keyed.keys[role])).get_json()["data"][0]
        assert "prompt" not in plain and "response" not in plain and len(plain["prompt_sha256"]) == 64
        asked = keyed.client.get("/api/logs?text=true", headers=bearer(keyed.keys[role])).get_json()["data"][0]
        assert "hi" in asked["prompt"] and asked["response"]
    assert_error(keyed.client.get("/api/logs?text=true", headers=bearer(keyed.keys["user"])), 403,
                 "permission_error", "wrong_role")
    assert_error(keyed.client.get("/api/logs?text=yes please", headers=bearer(keyed.keys["admin"])), 400,
                 "invalid_request_error", "invalid_value")


def test_a_key_may_ask_for_a_lower_class(make_box):
    box = make_box()
    key = create_key(box.settings.home, "user", "--priority", "interactive")
    admitted = []
    admit = box.admission.admit
    box.admission.admit = lambda client, cls, limits, size=1: admitted.append(cls) or admit(client, cls, limits, size)
    assert box.client.post(CHAT, json=chat_body(priority="batch"), headers=bearer(key)).status_code == 200
    assert box.client.post(CHAT, json=chat_body(), headers=bearer(key)).status_code == 200
    assert admitted == ["batch", "interactive"]


def test_keys_create_checks_its_options(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli, ["keys", "create", "--role", "user", "--priority", "vip", "--home", str(tmp_path)])
    assert bad.exit_code == 2 and "interactive" in bad.output
    bad = runner.invoke(cli, ["keys", "create", "--role", "user", "--expires", "soon", "--home", str(tmp_path)])
    assert bad.exit_code == 2 and "2027-01-31" in bad.output
    bad = runner.invoke(cli, ["keys", "create", "--role", "root", "--home", str(tmp_path)])
    assert bad.exit_code == 2
    missing = runner.invoke(cli, ["keys", "revoke", "nothere", "--home", str(tmp_path)])
    assert missing.exit_code == 1 and "keys list" in missing.output


# -- the real service -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_service_beyond_loopback(tmp_path):
    import openai
    import requests


    home = tmp_path / "home"
    admin, user = create_key(home, "admin"), create_key(home, "user", "--name", "app")
    svc = start_service(home, args=("--host", "0.0.0.0"))
    try:
        url = svc.url
        anonymous = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=user, max_retries=0, timeout=120)
        reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                               model="smollm2-135m-instruct")
        assert reply.choices[0].message.content
        row = svc.last_row()
        assert row["status"] == 200 and row["key_id"] == key_id(user)
        r = requests.post(url + "/api/power", json={"state": "idle"}, headers=bearer(user), timeout=30)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = requests.get(url + "/api/logs", headers=bearer(admin) | {"Host": "evil.example:8080"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
        r = requests.post(url + "/api/power", data='{"state": "deep_idle"}', timeout=30,
                          headers=bearer(admin) | {"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
        r = requests.post(url + "/api/power", data='{"state": "idle"}', timeout=30,
                          headers=bearer(admin) | {"Content-Type": "text/plain"})
        assert r.status_code == 415
        assert requests.get(url + "/api/status", headers=bearer(admin), timeout=30).json()["state"] == "active"
        assert requests.get(url + "/readyz", timeout=30).status_code == 200
        status = [sys.executable, "-m", "appliance", "status", "--url", url]
        refused = subprocess.run(status, capture_output=True, text=True, timeout=60,
                                 env={"PATH": "/usr/bin:/bin", "APPLIANCE_HOME": str(home)})
        assert refused.returncode == 1 and "401" in refused.stderr
        shown = subprocess.run(status, capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin", "APPLIANCE_HOME": str(home), "APPLIANCE_API_KEY": admin})
        assert shown.returncode == 0 and "state      active" in shown.stdout, shown.stderr
    finally:
        svc.stop()
    stored = b"".join(p.read_bytes() for p in home.glob("logs.db*"))
    for key in (admin, user):
        assert key.split("-", 2)[2].encode() not in stored


@pytest.mark.slow
@pytest.mark.browser
def test_the_ui_asks_for_a_key_and_then_works(tmp_path, browser):
    """Real Chromium, under the CSP, against a service that requires keys: 401, the key form, then chat."""

    home = tmp_path / "home"
    admin = create_key(home, "admin")
    svc = start_service(home)
    try:
        browser.get(svc.url + "/")
        wait_for(browser, "return !document.getElementById('key-form').hidden")  # /api/status answered 401
        browser.find_element("id", "api-key").send_keys(admin)
        browser.find_element("css selector", "#key-form button").click()
        wait_for(browser, "return document.getElementById('power').dataset.state === 'active'")
        chat(browser, "Say hi.", max_tokens=8)
        wait_for(browser, "const m = document.querySelector('.message.assistant'); return m && m.dataset.finish")
        assert browser.find_element("id", "error").text == ""
        row = svc.last_row()
        answer = browser.execute_script(  # the answer as received: the page shows it rendered as Markdown
            "return JSON.parse(localStorage.getItem('appliance.conversations'))[0].messages.pop().content")
        assert row["status"] == 200 and row["key_id"] == key_id(admin) and row["response"] == answer
        browser.find_element("css selector", "nav a[data-page=status]").click()
        browser.find_element("css selector", "button[data-power=idle]").click()  # a POST with the page's Origin
        wait_for(browser, "return document.getElementById('power').dataset.state === 'idle'")
        stored = browser.execute_script("return sessionStorage.getItem('appliance.api_key')")
        assert stored == admin
        browser.execute_script("sessionStorage.clear()")
    finally:
        svc.stop()


def test_what_an_admin_changes_is_a_row_with_the_key_that_did_it(keyed):
    admin = keyed.keys["admin"]
    assert keyed.client.post("/api/power", json={"state": "idle"}, headers=bearer(admin)).status_code == 200
    assert keyed.client.post("/api/power", json={"state": "asleep"}, headers=bearer(admin)).status_code == 400
    keyed.client.get("/api/status", headers=bearer(admin))  # reads are not logged
    bad, good = keyed.state.db.recent_requests(2)
    assert (good["endpoint"], good["status"], good["key_id"]) == ("/api/power", 200, key_id(admin))
    assert json.loads(good["prompt"]) == {"state": "idle"} and good["seq"] is not None
    assert (bad["status"], bad["key_id"]) == (400, key_id(admin)) and "asleep" in bad["prompt"] and bad["error"]
