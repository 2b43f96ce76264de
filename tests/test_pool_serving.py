"""The model pool on real models: the bundled SmolLM2 and a second package registered beside it, each in a
runner process of its own, through the real server and the real openai client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest
import requests
from click.testing import CliRunner

from appliance.cli import cli
from models import bundled_embedding, find_model
from models.manifest import write_manifest
from tests.helpers import MODEL, bearer, create_key, key_id, needs_bundled_model, start_service

pytestmark = [pytest.mark.slow, needs_bundled_model]

SECOND = "smollm2-copy"
# Small slots keep two models within a CI box's memory: each counts ~140 MiB (file + KV cache).
LIGHT = {"APPLIANCE_PARALLEL": "2", "APPLIANCE_CONTEXT_LENGTH": "1024"}


def second_package(tmp_path):
    """A second real package: the bundled GGUF under another name, registered with the real CLI."""
    folder = tmp_path / "packages" / SECOND
    folder.mkdir(parents=True)
    source = find_model(MODEL).path
    try:
        os.link(source, folder / source.name)  # same bytes, no copy where the file system allows
    except OSError:
        shutil.copy(source, folder / source.name)
    write_manifest(folder, name=SECOND, architecture="llama", format="gguf", quantization="Q4_1", target="cpu",
                   context_length=2048, aliases=("copy",))
    return folder


def register(home, folder) -> None:
    result = CliRunner().invoke(cli, ["models", "add", str(folder), "--home", str(home)])
    assert result.exit_code == 0, result.output


def chat(client, model: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=8, temperature=0)


def test_two_real_models_each_answer_from_their_own_runner(tmp_path):
    home = tmp_path / "home"
    folder = second_package(tmp_path)
    register(home, folder)
    admin, user = create_key(home, "admin"), create_key(home, "user")
    svc = start_service(home, extra_env=LIGHT)
    try:
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key=user, max_retries=0, timeout=120)
        first, second = chat(client, MODEL), chat(client, "copy")  # the second by its alias
        assert first.model == MODEL and second.model == SECOND
        assert first.choices[0].message.content and second.choices[0].message.content
        # The same weights, greedy: the same answer, from two processes.
        assert first.choices[0].message.content == second.choices[0].message.content

        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) - {bundled_embedding.NAME} == {MODEL, SECOND}  # the embedding model, where installed
        info = listed[SECOND].model_extra["appliance"]
        assert info["loaded"] and info["format"] == "gguf" and info["quantization"] == "Q4_1"
        assert info["size_bytes"] == find_model(MODEL).path.stat().st_size and info["context_length"] == 1024

        # What a user key and an unauthenticated health check see: no path, no pid.
        for text in (requests.get(svc.url + "/v1/models", headers=bearer(user), timeout=10).text,
                     requests.get(svc.url + "/readyz", timeout=10).text,
                     requests.get(svc.url + "/healthz", timeout=10).text):
            assert str(tmp_path) not in text and str(find_model(MODEL).path.parent) not in text
            assert "pid" not in text and '"path"' not in text

        models = requests.get(svc.url + "/api/models", headers=bearer(admin), timeout=10).json()["data"]
        pids = {m["id"]: m["runner_pid"] for m in models if m["loaded"]}
        assert len(set(pids.values())) == 2 and all(psutil.pid_exists(p) for p in pids.values())
        assert set(psutil.Process(svc.proc.pid).children()) >= {psutil.Process(p) for p in pids.values()}
        assert next(m for m in models if m["id"] == SECOND)["path"].startswith(str(folder))

        # An operator's CLI, with an admin key, unloads and loads the second model.
        env = {**os.environ, "APPLIANCE_API_KEY": admin, "APPLIANCE_HOME": str(home)}
        for command, shown in (("unload", f"{SECOND} unloaded"), ("load", f"{SECOND} loaded in")):
            out = subprocess.run([sys.executable, "-m", "appliance", "models", command, "copy", "--url", svc.url],
                                 env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and shown in out.stdout, out.stdout + out.stderr
        assert not psutil.pid_exists(pids[SECOND]) or psutil.Process(pids[SECOND]).status() == psutil.STATUS_ZOMBIE
        assert chat(client, SECOND).choices[0].message.content == first.choices[0].message.content
    finally:
        assert svc.stop() == 0
    with sqlite3.connect(home / "logs.db") as conn:
        events = conn.execute("SELECT event, model, who, outcome FROM model_events ORDER BY id").fetchall()
    admin_id = f"key:{key_id(admin)}"
    assert events == [("load", MODEL, "system", "ok"), ("load", SECOND, "system", "ok"),
                      ("unload", SECOND, admin_id, "ok"), ("load", SECOND, admin_id, "ok")]


def test_a_memory_budget_for_one_model_unloads_the_other_runner(tmp_path):
    home = tmp_path / "home"
    register(home, second_package(tmp_path))
    admin = create_key(home, "admin")
    svc = start_service(home, extra_env=LIGHT | {"APPLIANCE_MAX_MODEL_MEMORY_MB": "200"})
    try:
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key=admin, max_retries=0, timeout=120)
        status = requests.get(svc.url + "/api/status", headers=bearer(admin), timeout=10).json()
        first_pid = status["model"]["runner_pid"]
        assert status["models"]["loaded"] == [MODEL] and status["models"]["estimated_memory_mib"] <= 200
        assert chat(client, SECOND).model == SECOND
        status = requests.get(svc.url + "/api/status", headers=bearer(admin), timeout=10).json()
        assert status["models"]["loaded"] == [SECOND]
        assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
        evicted = [e for e in status["models"]["events"] if e["event"] == "evict"]
        assert evicted and evicted[0]["model"] == MODEL and evicted[0]["who"] == "system"
        assert chat(client, MODEL).model == MODEL  # and back, on demand
    finally:
        assert svc.stop() == 0


def test_a_hung_runner_fails_its_live_probes_and_is_restarted(tmp_path):
    home = tmp_path / "home"
    svc = start_service(home, extra_env=LIGHT | {"APPLIANCE_PROBE_EVERY": "0.5", "APPLIANCE_PROBE_TIMEOUT": "1"})
    hung = requests.get(svc.url + "/api/status", timeout=10).json()["model"]["runner_pid"]
    try:
        os.kill(hung, signal.SIGSTOP)  # the engine stops answering, as a wedged GPU driver would leave it
        deadline = time.monotonic() + 90
        restarts = []
        while not restarts and time.monotonic() < deadline:
            time.sleep(0.5)
            found = requests.get(svc.url + "/api/models/events", timeout=10).json()["data"]
            restarts = [e for e in found if e["event"] == "restart"]
        assert restarts and restarts[0]["outcome"] == "ok" and restarts[0]["model"] == MODEL
        failed = [e for e in found if e["event"] == "probe_failed"]
        assert len(failed) >= 3 and "1 s allowed" in failed[-1]["detail"]
        status = requests.get(svc.url + "/api/status", timeout=10).json()
        assert status["model"]["loaded"] and status["model"]["runner_pid"] != hung and not psutil.pid_exists(hung)
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert chat(client, MODEL).choices[0].message.content
        rows = requests.get(svc.url + "/api/logs", timeout=10).json()["data"]
        assert {r["endpoint"] for r in rows} <= {"/v1/chat/completions", "/api/status", "/api/models/events"}
    finally:
        if psutil.pid_exists(hung):
            os.kill(hung, signal.SIGKILL)
        assert svc.stop() == 0


def test_eight_clients_stream_through_a_swap_without_a_failure(tmp_path):
    home = tmp_path / "home"
    register(home, second_package(tmp_path))
    # Two models that generate at once share the cores: one thread each (llama.cpp's threads spin while they wait,
    # so more threads than cores slow both down many times over).
    one_thread = json.dumps({MODEL: {"threads": 1}, SECOND: {"threads": 1}})
    svc = start_service(home, extra_env=LIGHT | {"APPLIANCE_PARALLEL": "4", "APPLIANCE_MODEL_SETTINGS": one_thread})
    old_pid = requests.get(svc.url + "/api/status", timeout=10).json()["model"]["runner_pid"]
    answers, failures, stop = [], [], threading.Event()

    def client():
        api = openai.OpenAI(base_url=svc.url + "/v1", api_key="none", max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                chunks = list(api.chat.completions.create(model="smollm2", stream=True, max_tokens=12, temperature=0,
                                                          messages=[{"role": "user", "content": "Count to five."}]))
                answers.append({c.model for c in chunks})
            except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                failures.append(repr(exc))

    clients = [threading.Thread(target=client) for _ in range(8)]
    for t in clients:
        t.start()
    try:
        time.sleep(3)
        r = requests.post(svc.url + "/api/models/smollm2/swap", json={"package": SECOND}, timeout=120)
        assert r.status_code == 200 and r.json()["id"] == SECOND, r.text
        time.sleep(3)
    finally:
        stop.set()
        for t in clients:
            t.join()
    try:
        assert failures == []
        assert all(len(models) == 1 for models in answers)  # every answer wholly from one model
        assert {next(iter(m)) for m in answers} == {MODEL, SECOND}
        deadline = time.monotonic() + 30
        while psutil.pid_exists(old_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        status = requests.get(svc.url + "/api/status", timeout=10).json()
        assert status["models"]["loaded"] == [SECOND] and status["model"]["id"] == SECOND
        kinds = [(e["event"], e["model"]) for e in reversed(status["models"]["events"])]
        assert kinds[-3:] == [("load", SECOND), ("swap", SECOND), ("unload", MODEL)]
    finally:
        assert svc.stop() == 0


def test_a_chats_next_turn_after_a_swap_finds_its_prefix_on_the_new_model(tmp_path):
    # The swap prefills the chats the old model served last into the new model's slots: a client's next turn
    # reuses its whole earlier prompt there, not only the template's preamble that every fresh slot holds.
    home = tmp_path / "home"
    register(home, second_package(tmp_path))
    svc = start_service(home, extra_env=LIGHT)
    try:
        url = svc.url + "/v1/chat/completions"
        history = [{"role": "user", "content": "Tell me about the sea. " * 20}]
        body = {"model": "smollm2", "max_tokens": 8, "temperature": 0}
        first = requests.post(url, json=body | {"messages": history}, timeout=300).json()
        r = requests.post(svc.url + "/api/models/smollm2/swap", json={"package": SECOND}, timeout=120)
        assert r.status_code == 200 and r.json()["swap"]["chats_carried"] == 1, r.text
        history += [first["choices"][0]["message"], {"role": "user", "content": "And the mountains?"}]
        second = requests.post(url, json=body | {"messages": history}, timeout=300).json()
        assert second["model"] == SECOND
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first["usage"]["prompt_tokens"] > 100, (cached, first["usage"])
        events = requests.get(svc.url + "/api/models/events", timeout=10).json()["data"]
        assert "1 recent chats carried over" in next(e["detail"] for e in events if e["event"] == "swap")
    finally:
        assert svc.stop() == 0
