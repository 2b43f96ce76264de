"""The on-prem web UI in real headless Chromium against a real service and the real model.

One service for the module (llama.cpp, the bundled model, plus a second chat model: the same GGUF as a package
of its own, so the model picker has two to switch between); a second service with keys for the sign-in test.
Screenshots of every page at desktop and phone width go to build/ui-screenshots/ (ignored by git).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from appliance.cli import cli
from models import find_model
from tests.helpers import MODEL, create_key, package_of, start_chromium, start_service, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "build" / "ui-screenshots"
SECOND = "smollm2-copy"
PAGES = ("chat", "status", "models", "logs", "keys", "settings")


@pytest.fixture(scope="module")
def ui_service(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui-home")
    package = package_of(tmp_path_factory.mktemp("pkg") / SECOND, SECOND, gguf=find_model(MODEL).path)
    result = CliRunner().invoke(cli, ["models", "add", str(package), "--home", str(home)])
    assert result.exit_code == 0, result.output
    svc = start_service(home, extra_env={"APPLIANCE_MODEL_SETTINGS": json.dumps({SECOND: {"parallel": 1, "threads": 1}})})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def downloads(browser, tmp_path_factory):
    folder = tmp_path_factory.mktemp("downloads")
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    return folder


def open_page(browser, svc, page="chat"):
    browser.get(f"{svc.url}/#{page}")
    wait_for(browser, f"return !document.getElementById('page-{page}').hidden")


def send_chat(browser, text, max_tokens=24, temperature=0):
    browser.execute_script(
        "document.getElementById('temperature').value = arguments[0];"
        "document.getElementById('max-tokens').value = arguments[1];", temperature, max_tokens)
    wait_for(browser, "return document.getElementById('chat-model').options.length > 0")
    browser.find_element("id", "prompt").send_keys(text)
    browser.find_element("id", "send").click()


def pick_model(browser, name):
    wait_for(browser, f"return [...document.getElementById('chat-model').options].some(o => o.value === '{name}')")
    browser.execute_script("const s = document.getElementById('chat-model'); s.value = arguments[0];"
                           "s.dispatchEvent(new Event('change'));", name)


def wait_answer(browser, n, timeout=90):
    """The n-th answer's finish ('stop', 'length', 'stopped', 'error') once its stream has ended."""
    return wait_for(browser, f"const m = document.querySelectorAll('.message.assistant')[{n - 1}];"
                             "return m && !m.classList.contains('streaming') && m.dataset.finish", timeout)


def stored_conversations(browser):
    return json.loads(browser.execute_script("return localStorage.getItem('appliance.conversations') || '[]'"))


def screenshot(browser, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / f"{name}.png"))


def newest_download(folder: Path, suffix: str, timeout=20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.glob(f"*{suffix}") if p.stat().st_size > 0]
        if done:
            return max(done, key=lambda p: p.stat().st_mtime)
        time.sleep(0.1)
    raise AssertionError(f"no {suffix} download in {list(folder.iterdir())}")


def test_chat_streams_markdown_with_its_numbers_and_is_logged(browser, ui_service):
    open_page(browser, ui_service)
    assert MODEL in browser.title
    wait_for(browser, "return document.getElementById('power').dataset.state === 'active'")
    # Watch the answer grow: a streamed answer is seen at several lengths before it ends.
    browser.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const m = document.querySelector('.message.assistant .body');
          if (m) window.__lengths.push(m.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    send_chat(browser, "Count from 1 to 10, separated by commas.", max_tokens=40)
    assert wait_answer(browser, 1) in ("stop", "length")
    lengths = [n for n in browser.execute_script("return window.__lengths") if n]
    assert len(set(lengths)) >= 2, f"the answer did not arrive in pieces: {lengths}"

    meta = browser.execute_script("return {...document.querySelector('.message.assistant .meta').dataset}")
    assert int(meta["completionTokens"]) > 0 and int(meta["promptTokens"]) > 0
    assert float(meta["ttftMs"]) > 0 and float(meta["tokensPerS"]) > 0
    row = ui_service.last_row()
    assert row["endpoint"] == "/v1/chat/completions" and row["status"] == 200 and row["stream"] == 1
    stored = stored_conversations(browser)[0]["messages"]
    assert row["response"] == stored[-1]["content"]
    assert row["completion_tokens"] == int(meta["completionTokens"])

    # The second turn carries the conversation, and the system prompt goes first.
    browser.find_element("css selector", "#more-options summary").click()
    browser.find_element("id", "system-prompt").send_keys("You are terse.")
    send_chat(browser, "Now say goodbye.")
    wait_answer(browser, 2)
    messages = json.loads(ui_service.last_row()["prompt"])  # the row keeps the messages as sent
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == "You are terse."
    assert messages[1]["content"].startswith("Count from 1 to 10")
    screenshot(browser, "chat-desktop")


def test_stop_ends_the_generation_on_the_box(browser, ui_service):
    open_page(browser, ui_service)
    browser.find_element("id", "new-chat").click()
    send_chat(browser, "Write the numbers from 1 to 300, one per line.", max_tokens=600)
    wait_for(browser, "const m = document.querySelector('.message.assistant .body');"
                      "return m && m.textContent.length > 5")
    browser.find_element("id", "stop").click()
    assert wait_answer(browser, 1) == "stopped"
    row = ui_service.last_row(timeout=15)
    assert row["status"] == 499 and row["finish_reason"] == "cancelled", row
    assert row["completion_tokens"] < 600


def test_conversations_are_kept_renamed_exported_imported_and_deleted(browser, ui_service, downloads):
    open_page(browser, ui_service)
    before = stored_conversations(browser)
    assert len(before) >= 2, "the earlier tests' conversations are kept in this browser"
    browser.refresh()
    wait_for(browser, f"return document.querySelectorAll('#conversation-list li').length === {len(before)}")

    browser.find_element("id", "rename-chat").click()
    alert = browser.switch_to.alert
    alert.send_keys("Counting test")
    alert.accept()
    assert stored_conversations(browser)[0]["title"] == "Counting test"
    assert "Counting test" in browser.find_element("id", "conversation-list").text

    browser.find_element("id", "export-chats").click()
    exported = json.loads(newest_download(downloads, ".json").read_text())
    assert len(exported["conversations"]) == len(before)

    browser.find_element("id", "delete-chat").click()
    browser.switch_to.alert.accept()
    assert len(stored_conversations(browser)) == len(before) - 1

    upload = downloads / "to-import.json"
    upload.write_text(json.dumps(exported))
    browser.find_element("id", "import-chats").send_keys(str(upload))
    wait_for(browser, f"return JSON.parse(localStorage.getItem('appliance.conversations')).length === {2 * len(before) - 1}")
    ids = [c["id"] for c in stored_conversations(browser)]
    assert len(set(ids)) == len(ids), "imported conversations get ids of their own"

    upload.write_text('{"not": "conversations"}')
    browser.find_element("id", "import-chats").send_keys(str(upload))
    wait_for(browser, "return document.getElementById('error').textContent.startsWith('Import failed')")


def test_switch_models_in_the_picker(browser, ui_service):
    open_page(browser, ui_service)
    browser.find_element("id", "new-chat").click()
    wait_for(browser, f"return [...document.getElementById('chat-model').options].some(o => o.value === '{SECOND}')")
    options = browser.execute_script("return [...document.getElementById('chat-model').options].map(o => o.value)")
    assert options[0] == MODEL and SECOND in options
    assert not any("minilm" in o for o in options), "embedding models are not offered for chat"
    pick_model(browser, SECOND)
    loaded = browser.execute_script("return document.getElementById('chat-model').selectedOptions[0].dataset.loaded")
    browser.execute_script("""
        window.__loadingShown = false;
        new MutationObserver(() => { window.__loadingShown ||= !!document.querySelector('.message .loading'); })
          .observe(document.getElementById('messages'), {childList: true, subtree: true});""")
    send_chat(browser, "Say hello.", max_tokens=8)
    assert wait_answer(browser, 1, timeout=120) in ("stop", "length")
    assert ui_service.last_row()["model"] == SECOND
    if loaded == "false":  # the first request to a model not loaded yet says it waits for the load
        assert browser.execute_script("return window.__loadingShown")
    wait_for(browser, "return document.getElementById('chat-model').selectedOptions[0].dataset.loaded === 'true'")


def test_logs_filter_detail_and_csv_export(browser, ui_service, downloads):
    open_page(browser, ui_service)
    browser.find_element("id", "new-chat").click()
    pick_model(browser, MODEL)
    send_chat(browser, "Spell the word zebracorn.", max_tokens=8)
    wait_answer(browser, 1)
    wanted = ui_service.last_row()["id"]

    open_page(browser, ui_service, "logs")
    wait_for(browser, "return document.querySelectorAll('#log-rows tr').length > 0")
    assert browser.execute_script("return +document.querySelector('#log-rows tr').dataset.id") == wanted  # newest first
    browser.find_element("id", "filter-q").send_keys("zebracorn")
    browser.find_element("css selector", "#log-filters button[type=submit]").click()
    wait_for(browser, "const r = document.querySelectorAll('#log-rows tr'); return r.length === 1")
    assert browser.execute_script("return +document.querySelector('#log-rows tr').dataset.id") == wanted
    browser.execute_script("document.getElementById('filter-model').value = arguments[0]", SECOND)
    browser.find_element("css selector", "#log-filters button[type=submit]").click()
    wait_for(browser, "return !document.getElementById('logs-empty').hidden")
    browser.execute_script("document.getElementById('filter-model').value = arguments[0]", MODEL)
    browser.find_element("css selector", "#log-filters button[type=submit]").click()
    wait_for(browser, "return document.querySelectorAll('#log-rows tr').length === 1")

    browser.find_element("css selector", "#log-rows tr button.link").click()
    wait_for(browser, "return !document.getElementById('log-detail').hidden")
    assert "zebracorn" in browser.find_element("id", "log-detail-prompt").text
    screenshot(browser, "logs-detail-desktop")

    browser.find_element("id", "export-csv").click()
    rows = list(csv.DictReader(io.StringIO(newest_download(downloads, ".csv").read_text())))
    assert [int(r["id"]) for r in rows] == [wanted]
    assert rows[0]["status"] == "200" and "zebracorn" in rows[0]["prompt"] and rows[0]["model"] == MODEL

    browser.find_element("id", "verify-log").click()
    wait_for(browser, "return document.getElementById('verify-result').dataset.ok === 'true'")
    assert "OK" in browser.find_element("id", "verify-result").text

    browser.find_element("css selector", "#log-filters button[type=reset]").click()
    wait_for(browser, "return document.getElementById('filter-q').value === ''")
    browser.find_element("id", "filter-status").send_keys("ok")
    browser.find_element("css selector", "#log-filters button[type=submit]").click()
    wait_for(browser, "const r = [...document.querySelectorAll('#log-rows tr')];"
                      "return r.length > 0 && r.every(t => t.children[6].textContent === '200')")
    # The priority class each request ran in is a filter too: the chats above ran in the default class.
    browser.execute_script("document.getElementById('filter-priority').value = 'batch'")
    browser.find_element("css selector", "#log-filters button[type=submit]").click()
    wait_for(browser, "return !document.getElementById('logs-empty').hidden")
    browser.execute_script("document.getElementById('filter-priority').value = 'default'")
    browser.find_element("css selector", "#log-filters button[type=submit]").click()
    wait_for(browser, "const r = [...document.querySelectorAll('#log-rows tr')];"
                      "return r.length > 0 && r.every(t => t.children[5].textContent === 'default')")


def test_status_page_forces_idle_and_shows_events(browser, ui_service):
    open_page(browser, ui_service, "status")
    wait_for(browser, "return document.getElementById('page-status').dataset.state === 'active'")
    browser.find_element("css selector", "button[data-power=idle]").click()
    wait_for(browser, "return document.getElementById('page-status').dataset.state === 'idle'")
    wait_for(browser, "return document.getElementById('power').dataset.state === 'idle'")
    wait_for(browser, "return document.querySelector('#power-events tbody').textContent.includes('admin request')")
    assert "load" in browser.find_element("css selector", "#status-model-events tbody").text
    # The charts of the last hour (uPlot, vendored) over the requests the earlier tests made.
    wait_for(browser, "return document.querySelectorAll('#charts canvas').length === 4")
    assert int(browser.execute_script("return document.getElementById('charts').dataset.requests")) > 0
    screenshot(browser, "status-desktop")
    browser.find_element("css selector", "button[data-power=active]").click()
    wait_for(browser, "return document.getElementById('page-status').dataset.state === 'active'")


def test_settings_page_shows_where_each_value_came_from(browser, ui_service):
    open_page(browser, ui_service, "settings")
    wait_for(browser, "return document.querySelectorAll('#settings-table tbody tr').length > 20")
    rows = {r[0]: r for r in browser.execute_script(
        "return [...document.querySelectorAll('#settings-table tbody tr')].map(t => [...t.children].map(c => c.textContent))")}
    assert rows["model_settings"][2] == "environment" and '"parallel":1' in rows["model_settings"][1]
    assert rows["queue_size"][2] == "default" and rows["queue_size"][3] == "APPLIANCE_QUEUE_SIZE"
    screenshot(browser, "settings-desktop")


def test_models_page_lists_loads_and_unloads(browser, ui_service):
    open_page(browser, ui_service, "models")
    wait_for(browser, f"return document.querySelector('#model-table tbody').textContent.includes('{SECOND}')")
    text = browser.find_element("css selector", "#model-table tbody").text
    assert "gguf" in text and "Q4_1" in text and "embedding" in text
    button = f"#model-table button[data-model='{SECOND}']"
    if browser.execute_script(f"return document.querySelector(\"{button}\").dataset.action") == "unload":
        browser.find_element("css selector", button).click()
        wait_for(browser, f"return document.querySelector(\"{button}\").dataset.action === 'load'")
    browser.find_element("css selector", button).click()
    wait_for(browser, f"return document.querySelector(\"{button}\").dataset.action === 'unload'", timeout=120)
    wait_for(browser, f"return document.querySelector('#model-events tbody').textContent.includes('{SECOND}')")
    browser.find_element("id", "verify-models").click()
    wait_for(browser, "return document.getElementById('verify-models-result').dataset.ok === 'true'", timeout=120)
    assert "ok: sha256 ok" in browser.find_element("css selector", "#model-table tbody").text
    screenshot(browser, "models-desktop")


def test_models_page_imports_a_package_tar_that_is_on_the_box(browser, ui_service, tmp_path):
    tar = tmp_path / "carried.tar"
    package = package_of(tmp_path / "carried", "carried-on-usb")
    result = CliRunner().invoke(cli, ["models", "export", str(package), "--out", str(tar)])
    assert result.exit_code == 0, result.output
    open_page(browser, ui_service, "models")
    browser.find_element("id", "import-path").send_keys(str(tar / "missing"))
    browser.find_element("css selector", "#import-form button[type=submit]").click()
    wait_for(browser, "return document.getElementById('models-result').textContent.includes('Import refused')")
    path = browser.find_element("id", "import-path")
    path.clear()
    path.send_keys(str(tar))
    browser.find_element("css selector", "#import-form button[type=submit]").click()
    wait_for(browser, "return document.getElementById('models-result').textContent.includes('Imported carried-on-usb')")
    wait_for(browser, "return document.querySelector('#model-table tbody').textContent.includes('carried-on-usb')")


def test_model_text_is_shown_as_text_never_run(browser, ui_service):
    open_page(browser, ui_service)
    hostile = ("# Title\n<img src=x onerror=\"window.__pwned=1\">\n<script>window.__pwned=2</script>\n"
               "**bold <b>x</b>** and `<i>code</i>`\n```html\n<script>window.__pwned=3</script>\n```\n"
               "- [link](javascript:window.__pwned=4)\n")
    result = browser.execute_async_script("""
        const [text, done] = arguments;
        import('/static/markdown.js').then(({renderMarkdown}) => {
          const div = document.createElement('div');
          div.className = 'message assistant';
          div.appendChild(renderMarkdown(text));
          document.getElementById('messages').appendChild(div);
          setTimeout(() => done({
            text: div.textContent, pwned: window.__pwned || 0,
            tags: [...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
            code: div.querySelector('pre code').textContent}), 300);
        });""", hostile)
    assert result["pwned"] == 0
    assert set(result["tags"]) <= {"h4", "p", "br", "strong", "code", "pre", "ul", "li", "em"}, result["tags"]
    assert '<img src=x onerror="window.__pwned=1">' in result["text"]
    assert "<script>window.__pwned=2</script>" in result["text"]
    assert result["code"] == "<script>window.__pwned=3</script>"


def test_a_hostile_answer_in_a_conversation_is_text(browser, ui_service, tmp_path):
    """The chat's own path for showing answers: a conversation (imported here) whose answer is HTML."""
    open_page(browser, ui_service)
    hostile = '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>'
    upload = tmp_path / "hostile.json"
    upload.write_text(json.dumps({"conversations": [{"id": "hostile", "title": "<b>t</b>", "messages": [
        {"role": "user", "content": "<img src=y onerror=\"window.__pwned=3\">"},
        {"role": "assistant", "content": hostile, "stats": {"finish": "stop"}}]}]}))
    browser.find_element("id", "import-chats").send_keys(str(upload))
    wait_for(browser, "const m = document.querySelector('.message.assistant .body');"
                      "return m && m.textContent.includes('onerror')")
    time.sleep(0.3)
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('#messages img, #messages script, "
                                  "#conversation-list b').length") == 0
    assert hostile in browser.find_element("css selector", ".message.assistant .body").text
    browser.find_element("id", "delete-chat").click()
    browser.switch_to.alert.accept()


def test_markdown_renderer_shapes(browser, ui_service):
    open_page(browser, ui_service)
    shapes = browser.execute_async_script("""
        const done = arguments[0];
        import('/static/markdown.js').then(({renderMarkdown}) => {
          const html = (t) => { const d = document.createElement('div'); d.appendChild(renderMarkdown(t)); return d.innerHTML; };
          done([html('a **b** *c* `d`'), html('1. x\\n2. y'), html('- a\\n- b'), html('```py\\nx = 1\\n'),
                html('> q'), html('## H'), html('snake_case_name and 2 * 3 * 4'),
                html('__b__ and x.__y__z')]);
        });""")
    assert shapes[0] == "<p>a <strong>b</strong> <em>c</em> <code>d</code></p>"
    assert shapes[1] == "<ol><li>x</li><li>y</li></ol>"
    assert shapes[2] == "<ul><li>a</li><li>b</li></ul>"
    assert shapes[3] == '<pre class="code-block" data-language="py"><code class="language-py">x = 1\n</code></pre>'
    assert shapes[4] == "<blockquote><p>q</p></blockquote>"
    assert shapes[5] == "<h5>H</h5>"
    assert shapes[6] == "<p>snake_case_name and 2 * 3 * 4</p>"
    assert shapes[7] == "<p><strong>b</strong> and x.__y__z</p>"


def test_every_control_is_labelled_and_the_chat_works_from_the_keyboard(browser, ui_service):
    from selenium.webdriver.common.keys import Keys

    for page in PAGES:
        open_page(browser, ui_service, page)
        time.sleep(0.3)
        unlabelled = browser.execute_script("""
            return [...document.querySelectorAll('input, select, textarea, button')]
              .filter(e => e.offsetParent !== null || e.type === 'file')
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
              .map(e => e.outerHTML.slice(0, 80));""")
        assert unlabelled == [], f"{page}: {unlabelled}"
    open_page(browser, ui_service)
    browser.find_element("id", "new-chat").send_keys(Keys.ENTER)  # a focused button answers Enter
    wait_for(browser, "return document.querySelectorAll('.message').length === 0")
    browser.execute_script("document.getElementById('max-tokens').value = 4; document.getElementById('temperature').value = 0")
    prompt = browser.find_element("id", "prompt")
    prompt.send_keys("First line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line", Keys.ENTER)
    assert wait_answer(browser, 1) in ("stop", "length")
    assert browser.execute_script("return document.querySelector('.message.user').textContent") == "First line\nsecond line"
    browser.find_element("id", "prompt").send_keys(Keys.TAB)  # Stop is disabled when idle: Send is next
    assert browser.execute_script("return document.activeElement.id") == "send"
    assert browser.execute_script("return getComputedStyle(document.activeElement).outlineStyle") == "solid"
    browser.find_element("css selector", "nav a[data-page=logs]").send_keys(Keys.ENTER)
    wait_for(browser, "return !document.getElementById('page-logs').hidden")


def test_screenshots_at_phone_width(browser, ui_service):
    browser.set_window_size(390, 844)
    try:
        for page in PAGES:
            open_page(browser, ui_service, page)
            time.sleep(0.5)
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= 400, f"the {page} page scrolls sideways on a phone ({width} px)"
            screenshot(browser, f"{page}-phone")
    finally:
        browser.set_window_size(1280, 900)
    for page in PAGES:
        open_page(browser, ui_service, page)
        screenshot(browser, f"{page}-desktop")


def test_every_page_loads_nothing_from_outside_the_box(ui_service, tmp_path):
    """Chromium that can resolve no name and reach no address but the box's: every request it makes is logged."""
    driver = start_chromium(tmp_path / "chromium", ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                                                    "--proxy-server=http://0.0.0.0:9",
                                                    f"--proxy-bypass-list=127.0.0.1:{ui_service.port}"),
                            {"goog:loggingPrefs": {"performance": "ALL"}})
    try:
        for page in PAGES:
            open_page(driver, ui_service, page)
            time.sleep(1)
        urls = set()
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.add(message["params"]["request"]["url"])
        urls |= set(driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"))
        assert any(u.endswith("/static/app.js") for u in urls) and any(u.endswith("/api/logs?limit=1") for u in urls)
        # chrome:// pages are the browser's own (its start page), never the network.
        network = {u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")}
        outside = sorted(u for u in network if not u.startswith(ui_service.url + "/"))
        assert not outside, outside
        html = driver.page_source
        assert "https://" not in html and "http://" not in html
    finally:
        driver.quit()


def test_sign_in_with_keys_shows_each_role_its_pages(browser, tmp_path):
    home = tmp_path / "keyed"
    home.mkdir()
    admin = create_key(home, "admin")
    user = create_key(home, "user")
    svc = start_service(home)
    try:
        browser.get(svc.url + "/")
        browser.execute_script("sessionStorage.clear()")
        browser.get(svc.url + "/")
        wait_for(browser, "return !document.getElementById('key-form').hidden")
        assert browser.execute_script("return document.getElementById('main').hidden")
        screenshot(browser, "sign-in-desktop")
        browser.find_element("id", "api-key").send_keys("sk-wrong-key")
        browser.find_element("css selector", "#key-form button[type=submit]").click()
        wait_for(browser, "return document.getElementById('key-message').textContent.includes('refused')")

        browser.find_element("id", "api-key").send_keys(user)
        browser.find_element("css selector", "#key-form button[type=submit]").click()
        wait_for(browser, "return document.getElementById('whoami').dataset.role === 'user'")
        hidden = browser.execute_script("return [...document.querySelectorAll('nav .tab')].filter(t => t.hidden)"
                                        ".map(t => t.dataset.page)")
        assert sorted(hidden) == ["keys", "logs", "settings", "status"]
        assert browser.execute_script("return sessionStorage.getItem('appliance.api_key')") == user
        assert browser.execute_script("return localStorage.getItem('appliance.api_key')") is None
        send_chat(browser, "Hi.", max_tokens=4)
        assert wait_answer(browser, 1) in ("stop", "length")
        assert svc.last_row()["key_id"] == user.split("-")[1]
        browser.get(svc.url + "/#status")
        wait_for(browser, "const r = document.querySelector('#page-status .refused'); return r && !r.hidden")
        assert not browser.find_element("id", "status-power").is_displayed()

        browser.find_element("id", "sign-out").click()
        wait_for(browser, "return !document.getElementById('key-form').hidden")
        browser.find_element("id", "api-key").send_keys(admin)
        browser.find_element("css selector", "#key-form button[type=submit]").click()
        wait_for(browser, "return document.getElementById('whoami').dataset.role === 'admin'")
        browser.get(svc.url + "/#status")
        wait_for(browser, "return !!document.getElementById('page-status').dataset.state")

        # The Keys page: create a key (shown once), see it listed, revoke it.
        browser.get(svc.url + "/#keys")
        wait_for(browser, f"return document.querySelector('#key-table tbody').textContent.includes('{user.split('-')[1]}')")
        browser.find_element("id", "new-key-name").send_keys("kiosk-2")
        browser.find_element("css selector", "#key-create button[type=submit]").click()
        wait_for(browser, "return !document.getElementById('new-key').hidden")
        created = browser.find_element("id", "new-key-value").text
        assert created.startswith("sk-")
        new_id = created.split("-")[1]
        wait_for(browser, f"return !!document.querySelector(\"button[data-revoke='{new_id}']\")")
        screenshot(browser, "keys-desktop")
        browser.find_element("css selector", f"button[data-revoke='{new_id}']").click()
        browser.switch_to.alert.accept()
        wait_for(browser, f"return !document.querySelector(\"button[data-revoke='{new_id}']\")")
        assert requests.get(svc.url + "/v1/models", headers={"Authorization": f"Bearer {created}"},
                            timeout=10).status_code == 401
    finally:
        browser.execute_script("sessionStorage.clear()")
        svc.stop()
