"""The ``appliance`` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import package_of, start_service


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


@pytest.mark.slow  # hashes the bundled model, which only the [llama] extra installs
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


# -- the data folder comes from the one config ---------------------------------------


def run_as_user(tmp_path: Path, *args, check=True):
    """The command as a user runs it with no APPLIANCE_HOME: ~ is tmp_path/user, so ~/.appliance is empty."""
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_HOME"} | {"HOME": str(tmp_path / "user")}
    result = subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, env=env, timeout=120)
    assert not check or result.returncode == 0, result.stderr
    return result


def test_models_add_list_and_remove_use_the_given_home(tmp_path):
    package, data = package_of(tmp_path / "pkg", "home-test-model"), tmp_path / "data"
    assert "added home-test-model" in run_as_user(tmp_path, "models", "add", str(package), "--home", str(data)).stdout
    assert (data / "models.json").exists() and not (tmp_path / "user" / ".appliance" / "models.json").exists()
    names = [e["name"] for e in json.loads(run_as_user(tmp_path, "models", "list", "--json", "--home", str(data)).stdout)]
    assert "home-test-model" in names
    names = [e["name"] for e in json.loads(run_as_user(tmp_path, "models", "list", "--json").stdout)]
    assert "home-test-model" not in names  # ~/.appliance has no packages
    run_as_user(tmp_path, "models", "remove", "home-test-model", "--home", str(data))
    assert json.loads((data / "models.json").read_text())["packages"] == []


@pytest.mark.slow
def test_serve_with_home_serves_a_package_registered_there(tmp_path):
    from models import find_model

    data = tmp_path / "data"
    package = package_of(tmp_path / "pkg", "home-served-model", gguf=find_model("smollm2").path)
    data.mkdir()
    (data / "models.json").write_text(json.dumps({"packages": [str(package)]}))  # as `models add` writes it
    service = start_service(tmp_path / "out", extra_env={"APPLIANCE_HOME": None, "HOME": str(tmp_path / "user")},
                            args=("--home", str(data), "--model", "home-served-model"))
    try:
        models = requests.get(service.url + "/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "home-served-model" and models[0]["appliance"]["default"]  # then the bundled one
        assert (data / "logs.db").exists() and not (tmp_path / "user" / ".appliance").exists()
    finally:
        service.stop()
