"""POST /v1/embeddings and model kinds on a fake embedding engine (fast tier): the route, its errors, batching
across requests, the queue, the log. tests/test_embeddings_real.py proves it on the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time

import pytest

from appliance.backends.base import ModelFacts, SamplingParams
from appliance.backends.embedding import EmbeddingBackend, register_embedder
from appliance.runner import protocol as msg
from models.catalog import ModelEntry
from models.kinds import EMBEDDING, gguf_kind
from models.manifest import write_manifest
from tests.helpers import CHAT, assert_openai_error, chat_body

EMBEDDINGS = "/v1/embeddings"
DIMS = 8
START, END = 256, 257  # the fake tokenizer's [CLS] and [SEP]


class FakeEmbedder(EmbeddingBackend):
    """Tokens: [START] + the text's UTF-8 bytes + [END]. A vector: the token ids counted into DIMS buckets,
    normalised, so equal texts give equal vectors and the batch never changes them."""

    name = "fake"

    def load(self) -> ModelFacts:
        self.config = json.loads(open(self.model_path).read())
        context = min(self.requested_context_length, self.config.get("context_length", 64))
        return ModelFacts(context_length=context, n_slots=self.config.get("batch", 16), n_batch=context,
                          n_vocab=258, info={"backend": "fake", "dimensions": DIMS, "pooling": "mean"})

    def close(self) -> None:
        pass

    def tokenize(self, text: str) -> list[int]:
        return [START, *text.encode(), END]

    def embed(self, sequences: list[list[int]]) -> bytes:
        time.sleep(self.config.get("step_seconds", 0.0))
        out = b""
        for tokens in sequences:
            counts = [0.0] * DIMS
            for t in tokens:
                counts[t % DIMS] += 1.0
            norm = sum(c * c for c in counts) ** 0.5
            out += struct.pack(f"<{DIMS}f", *(c / norm for c in counts))
        return out


register_embedder("fake", FakeEmbedder)


@pytest.fixture
def ebox(make_box):
    """A box with the fake chat model as its default and a fake embedding model "embedder"."""
    return embedding_box(make_box)


def embedding_box(make_box, embedder: dict | None = None, **settings):
    box = make_box(**settings)
    path = box.tmp_path / "embedder.json"
    path.write_text(json.dumps({"context_length": 64} | (embedder or {})))
    entry = ModelEntry(name="embedder", format="fake", path=path, aliases=("embedder-alias",), kind=EMBEDDING)
    box.state.models.catalog = lambda: [entry]
    return box


def embed(box, inputs, **extra):
    return box.client.post(EMBEDDINGS, json={"input": inputs} | extra)


def floats(item) -> list[float]:
    return item["embedding"]


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


# -- kinds ----------------------------------------------------------------------------------------------
def test_v1_models_shows_each_models_kind_and_the_vector_length(ebox):
    ebox.state.models.load(ebox.state.models.get("embedder"))  # a fake model's length is known once loaded
    models = {m["id"]: m["appliance"] for m in ebox.client.get("/v1/models").get_json()["data"]}
    assert models["fake"]["kind"] == "chat" and "dimensions" not in models["fake"]
    assert models["embedder"]["kind"] == "embedding" and models["embedder"]["dimensions"] == DIMS
    assert "sampling_defaults" not in models["embedder"]


def test_a_chat_model_asked_for_embeddings_is_a_400_naming_an_embedding_model(ebox):
    error = assert_openai_error(embed(ebox, "hi", model="fake"), 400, "model_kind_mismatch", "model")
    assert "'embedder'" in error["message"] and "/v1/embeddings" not in error["message"].split("served at")[0]
    assert ebox.last_row()["status"] == 400


def test_a_request_without_a_model_gets_the_embedding_model_setting(make_box):
    assert embed(embedding_box(make_box), "hi").get_json()["model"] == "embedder"  # unset: the first one known
    assert embed(embedding_box(make_box, embedding_model="embedder-alias"), "hi").get_json()["model"] == "embedder"
    error = assert_openai_error(embed(embedding_box(make_box, embedding_model="nope"), "hi"), 404)
    assert "setting 'embedding_model'" in error["message"] and "'nope'" in error["message"]
    assert_openai_error(embed(embedding_box(make_box, embedding_model="fake"), "hi"), 400, "model_kind_mismatch")


def test_an_embedding_model_asked_to_chat_is_a_400_naming_a_chat_model(ebox):
    for path, body in [(CHAT, chat_body()), ("/v1/completions", {"prompt": "hi"})]:
        error = assert_openai_error(ebox.client.post(path, json=body | {"model": "embedder-alias"}), 400,
                                    "model_kind_mismatch", "model")
        assert "'fake'" in error["message"] and "embedding model" in error["message"]
    assert ebox.state.models.get("embedder").runner.is_loaded is False  # refused before any load


def test_the_runner_itself_refuses_the_other_kinds_requests(ebox):
    pool = ebox.state.models
    embedder = pool.get("embedder")
    pool.load(embedder)
    refused = embedder.runner.submit(None, "hi", SamplingParams(max_tokens=2)).get(timeout=5)
    assert isinstance(refused, msg.Refused) and refused.code == "model_kind_mismatch"
    refused = pool.default.runner.submit(None, None, msg.EmbedParams(("hi",))).get(timeout=5)
    assert isinstance(refused, msg.Refused) and refused.code == "model_kind_mismatch"


def test_a_package_manifest_carries_its_kind(tmp_path):
    from models.catalog import find_model

    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF not a real model")
    write_manifest(folder, name="my-embedder", architecture="bert", format="gguf", quantization="F16", target="cpu",
                   context_length=512, kind="embedding")
    assert find_model(str(folder)).kind == "embedding"
    assert gguf_kind(folder / "model.gguf") == "chat"  # unreadable header: chat, and loading it will say why


# -- the endpoint ---------------------------------------------------------------------------------------
def test_one_string_gets_one_normalised_vector_with_usage(ebox):
    r = embed(ebox, "hello")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["object"] == "list" and body["model"] == "embedder"
    assert [d["index"] for d in body["data"]] == [0] and body["data"][0]["object"] == "embedding"
    vector = floats(body["data"][0])
    assert len(vector) == DIMS and abs(cosine(vector, vector) - 1) < 1e-5
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}  # [CLS] hello [SEP]


def test_a_batch_equals_its_inputs_one_by_one(ebox):
    texts = ["alpha", "beta gamma", "delta", "a much longer sentence than the others"]
    batch = [floats(d) for d in embed(ebox, texts).get_json()["data"]]
    for text, vector in zip(texts, batch):
        single = floats(embed(ebox, text).get_json()["data"][0])
        assert cosine(single, vector) >= 0.9999


def test_base64_decodes_to_the_same_floats(ebox):
    plain = [floats(d) for d in embed(ebox, ["one", "two"]).get_json()["data"]]
    coded = embed(ebox, ["one", "two"], encoding_format="base64").get_json()["data"]
    for vector, item in zip(plain, coded):
        # The JSON floats are float32 written in their shortest form: read back as float32, the same bytes.
        assert struct.pack(f"<{DIMS}f", *vector) == base64.b64decode(item["embedding"])


def test_token_arrays_are_the_sequences_the_model_reads(ebox):
    text_vector = floats(embed(ebox, "hi").get_json()["data"][0])
    tokens = [START, *b"hi", END]
    assert floats(embed(ebox, tokens).get_json()["data"][0]) == text_vector
    both = embed(ebox, [tokens, tokens[:2]]).get_json()
    assert len(both["data"]) == 2 and both["usage"]["prompt_tokens"] == 6


def test_the_row_records_the_sha256_of_input_and_vectors(ebox):
    r = embed(ebox, ["x", "y"], encoding_format="base64")
    row = ebox.last_row()
    data = b"".join(base64.b64decode(d["embedding"]) for d in r.get_json()["data"])
    assert row["endpoint"] == EMBEDDINGS and row["model"] == "embedder" and row["status"] == 200
    assert row["response_sha256"] == hashlib.sha256(data).hexdigest() and row["response"] is None
    assert row["prompt_sha256"] == hashlib.sha256('["x", "y"]'.encode()).hexdigest()
    assert row["prompt_tokens"] == 6 and row["completion_tokens"] == 0


def test_dimensions_is_accepted_only_as_the_models_own(ebox):
    assert embed(ebox, "a", dimensions=DIMS).status_code == 200
    error = assert_openai_error(embed(ebox, "a", dimensions=4), 400, "invalid_value", "dimensions")
    assert "not trained for shorter" in error["message"]


@pytest.mark.parametrize("body,code,param", [
    ({"input": ""}, "invalid_value", "input"),
    ({"input": []}, "invalid_value", "input"),
    ({"input": ["fine", ""]}, "invalid_value", "input"),
    ({"input": [[]]}, "invalid_value", "input"),
    ({"input": ["x"] * 10_000}, "invalid_value", "input"),
    ({"input": [1, "a"]}, "invalid_value", "input"),
    ({"input": [True, 2]}, "invalid_value", "input"),
    ({"input": "a", "encoding_format": "hex"}, "invalid_value", "encoding_format"),
    ({"input": "a", "temperature": 0}, "unknown_parameter", "temperature"),
    ({}, "missing_field", "input"),
])
def test_bad_bodies_are_400s_that_name_the_field(ebox, body, code, param):
    error = assert_openai_error(ebox.client.post(EMBEDDINGS, json=body), 400, code)
    assert error["param"].startswith(param)


def test_inputs_the_model_cannot_take_are_400s_naming_the_input(ebox):
    error = assert_openai_error(embed(ebox, ["short", "y" * 100]), 400, "context_length_exceeded", "input")
    assert "input[1]" in error["message"] and "64" in error["message"]
    error = assert_openai_error(embed(ebox, [[1, 2, 999]]), 400, "invalid_value", "input")
    assert "999" in error["message"]
    rows = ebox.rows()
    assert [r["status"] for r in rows] == [400, 400]


def test_a_text_over_max_prompt_chars_is_a_413_before_tokenizing(make_box):
    box = embedding_box(make_box, max_prompt_chars=50)
    assert_openai_error(embed(box, ["ok", "z" * 51]), 413, "input_too_long", "input")


def test_a_big_request_does_not_hold_up_a_small_one(make_box):
    box = embedding_box(make_box, embedder={"step_seconds": 0.02, "batch": 8})
    box.client.post(EMBEDDINGS, json={"input": "warm"})  # loads it
    big = threading.Thread(target=embed, args=(box, [f"text {i}" for i in range(2048)]))
    big.start()  # 256 batches of 8: about 5 s
    try:
        time.sleep(0.3)
        start = time.monotonic()
        assert embed(box, "small").status_code == 200
        assert time.monotonic() - start < 1.0
    finally:
        big.join()
    assert box.rows()[-2]["status"] == 200 and box.rows()[-2]["prompt_tokens"] > 2048


def test_embeddings_spend_their_input_tokens_from_the_clients_bucket(make_box):
    box = embedding_box(make_box, rate_limit_tpm=10)
    assert embed(box, "abcdefghij").status_code == 200  # 12 tokens: the bucket is spent
    assert_openai_error(embed(box, "a"), 429, "rate_limit_tokens")


def test_the_live_probe_of_an_embedding_model_asks_for_vectors(ebox):
    pool = ebox.state.models
    embedder = pool.get("embedder")
    pool.load(embedder)
    assert pool._probe(embedder, 2, 5.0) is None
    pool.check_health()
    assert embedder.probe_failures == 0


def test_a_name_is_never_swapped_to_a_model_of_another_kind(ebox):
    r = ebox.client.post("/api/models/fake/swap", json={"package": "embedder"})
    error = assert_openai_error(r, 400, "model_kind_mismatch", "package")
    assert "same kind" in error["message"]
    assert ebox.state.models.get("fake").name == "fake"


def test_an_onnx_embedding_batch_runs_in_groups_of_similar_length_within_the_limits():
    pytest.importorskip("onnxruntime")
    from appliance.backends.onnx_embedding import RUN_ROWS, RUN_TOKENS, _runs

    lengths = [5, 300, 7, 512, 6, 290, 512, 8] + [10] * 40
    groups = _runs([[1] * n for n in lengths])
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))  # each input once
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) <= RUN_ROWS and len(group) * longest <= RUN_TOKENS
    ordered = [lengths[i] for group in groups for i in group]
    assert ordered == sorted(ordered)  # shortest first: rows of one run differ little
