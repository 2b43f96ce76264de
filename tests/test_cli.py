"""The ``appliance`` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests


def run(*args, home=None, input=None, check=True):
    env = dict(os.environ)
    if home is not None:
        env["APPLIANCE_HOME"] = str(home)
    result = subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                            env=env, input=input, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("command", [[], ["serve"], ["chat"], ["models"], ["models", "verify"], ["models", "add"], ["models", "remove"], ["logs"], ["status"], ["export"], ["distill"], ["distill", "train"]])
def test_every_command_has_help(command):
    out = run(*command, "--help").stdout
    assert "Usage: " in out and "--help" in out


def test_serve_help_teaches_with_an_example():
    out = run("serve", "--help").stdout
    assert "curl http://127.0.0.1:8080/v1/chat/completions" in out
    assert "/readyz" in out


def test_models_list_and_verify():
    listed = json.loads(run("models", "list", "--json").stdout)
    assert listed[0]["name"] == "smollm2-135m-instruct" and listed[0]["available"]
    assert "OK   smollm2-135m-instruct" in run("models", "verify").stdout


def test_serve_with_unknown_model_fails_clearly(tmp_path):
    result = run("serve", "--model", "nope", home=tmp_path, check=False)
    assert result.returncode != 0
    assert "unknown model 'nope'" in result.stderr


def test_a_broken_model_registry_is_named_not_a_traceback(tmp_path):
    (tmp_path / "models.json").write_text("{not json")
    for command in (["models", "list"], ["models", "remove", "x"], ["serve"]):
        result = run(*command, home=tmp_path, check=False)
        assert result.returncode == 1, (command, result.stderr)
        assert "models.json is malformed" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_is_a_usage_error(tmp_path):
    (tmp_path / "config.toml").write_text("port = 'x'\n")
    result = run("logs", home=tmp_path, check=False)
    assert result.returncode == 2 and "port" in result.stderr


def test_logs_without_a_database_explains(tmp_path):
    result = run("logs", home=tmp_path, check=False)
    assert result.returncode == 1 and "appliance serve" in result.stderr


@pytest.mark.slow
def test_logs_shows_requests_of_a_running_service(service):
    requests.post(service.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    out = run("logs", "-n", "5", home=service.home).stdout
    assert "/v1/completions" in out and "200" in out
    rows = json.loads(run("logs", "--json", "-n", "1", home=service.home).stdout)
    assert rows[0]["endpoint"] == "/v1/completions" and rows[0]["completion_tokens"] == 3


@pytest.mark.slow
def test_chat_streams_an_answer_and_logs_it(tmp_path):
    result = run("chat", "--temperature", "0", "--max-tokens", "12", home=tmp_path, input="Count from 1 to 5.\n")
    assert "1" in result.stdout and "3" in result.stdout
    rows = json.loads(run("logs", "--json", home=tmp_path).stdout)
    assert rows[0]["endpoint"] == "cli:chat" and rows[0]["status"] == 200
