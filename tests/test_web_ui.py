"""The on-prem web UI in real headless Chromium against a real service and the real model."""

from __future__ import annotations


import pytest
from tests.helpers import chat, last_reply, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

def test_chat_streams_into_the_page_and_is_logged(browser, service):
    browser.get(service.url + "/")
    assert "smollm2-135m-instruct" in browser.title
    wait_for(browser, "return document.getElementById('power').dataset.state === 'active'")

    chat(browser, "Count from 1 to 5.")
    finish = wait_for(browser, "const m = document.querySelector('.message.assistant'); return m && m.dataset.finish")
    assert finish in ("stop", "length")
    reply = last_reply(browser)
    assert reply.strip()
    row = service.last_row()
    assert row["endpoint"] == "/v1/chat/completions" and row["status"] == 200 and row["stream"] == 1
    assert row["response"] == reply

    # The second turn carries the conversation.
    chat(browser, "Now say goodbye.")
    wait_for(browser, "const m = [...document.querySelectorAll('.message.assistant')]; return m.length === 2 && m[1].dataset.finish")
    assert '"Count from 1 to 5."' in service.last_row()["prompt"]


def test_stop_button_ends_the_generation_on_the_server(browser, service):
    browser.get(service.url + "/")
    chat(browser, "Write the numbers from 1 to 300, one per line.", max_tokens=600)
    wait_for(browser, "const m = document.querySelector('.message.assistant'); return m && m.firstChild && m.firstChild.textContent.length > 5")
    browser.find_element("id", "stop").click()
    assert wait_for(browser, "return document.querySelector('.message.assistant').dataset.finish") == "stopped"
    row = service.last_row(timeout=15)
    assert row["status"] == 499 and row["finish_reason"] == "cancelled"
    assert row["completion_tokens"] < 600


def test_logs_tab_and_power_controls(browser, service):
    browser.get(service.url + "/")
    browser.find_element("css selector", "button[data-tab=logs]").click()
    wait_for(browser, "return document.querySelectorAll('#log-rows tr').length > 0")
    first_endpoint = browser.execute_script("return document.querySelector('#log-rows tr td:nth-child(3)').textContent")
    assert first_endpoint.startswith("/v1/")

    browser.find_element("css selector", "button[data-tab=power-panel]").click()
    browser.find_element("css selector", "button[data-power=idle]").click()
    wait_for(browser, "return document.getElementById('power').dataset.state === 'idle'")
    browser.find_element("css selector", "button[data-power=active]").click()
    wait_for(browser, "return document.getElementById('power').dataset.state === 'active'")


def test_the_page_loads_nothing_from_outside_the_box(browser, service):
    browser.get(service.url + "/")
    wait_for(browser, "return document.readyState === 'complete'")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources, "the page should load its own script and stylesheet"
    assert all(url.startswith(service.url) for url in resources), resources
    html = browser.page_source
    assert "https://" not in html and "http://" not in html
