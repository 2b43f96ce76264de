"""Embeddings on the real bundled all-MiniLM-L6-v2: converted to GGUF on its first load, served by llama.cpp's
embedding mode in a real runner, asked with the real ``openai`` client over loopback; and the converter
checked against the fp32 model in transformers (torch is a test tool here, never the service's)."""

from __future__ import annotations

import base64
import struct
import threading
import time

import pytest

from models import bundled_embedding
from tests.helpers import assert_openai_error, needs_bundled_model, start_service

pytestmark = [pytest.mark.slow, needs_bundled_model,
              pytest.mark.skipif(bundled_embedding.source_zip() is None,
                                 reason=f"needs the bundled embedding model: {bundled_embedding.INSTALL}")]

MODEL = bundled_embedding.NAME
PARAPHRASE = ("The cat is sleeping on the sofa.", "A cat naps on the couch.")
UNRELATED = "Interest rates rose by half a percentage point this quarter."
SENTENCES = ["The cat sits on the mat.", "A feline is resting on a rug.", "Stock markets fell sharply today.",
             "Héllo, Wörld! naïve café, \u201cquotes\u201d 123,456.78", "unbelievably antidisestablishmentarianism",
             "日本語のテキスト and emoji 😀", "x", "Pump 3 pressure alarm: check the relief valve."]


@pytest.fixture(scope="module")
def embedding_service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("embeddings-home"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(embedding_service):
    import openai

    return openai.OpenAI(base_url=embedding_service.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def vectors(client, inputs, **extra) -> list[list[float]]:
    return [d.embedding for d in client.embeddings.create(model=MODEL, input=inputs, **extra).data]


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5


def test_a_paraphrase_pair_is_closer_than_an_unrelated_pair(client):
    a, b, c = vectors(client, [*PARAPHRASE, UNRELATED])
    assert cosine(a, b) > cosine(a, c) + 0.3 and cosine(a, b) > cosine(b, c) + 0.3


def test_batched_results_equal_single_results(client):
    batch = vectors(client, SENTENCES)
    for text, vector in zip(SENTENCES, batch):
        assert cosine(vectors(client, text)[0], vector) >= 0.9999, text


def test_the_vector_length_matches_v1_models(client):
    model = next(m for m in client.models.list().data if m.id == MODEL)
    assert model.model_extra["appliance"]["kind"] == "embedding"
    assert len(vectors(client, "length")[0]) == model.model_extra["appliance"]["dimensions"] == 384
    chat = next(m for m in client.models.list().data if m.id != MODEL)
    assert chat.model_extra["appliance"]["kind"] == "chat"


def test_base64_decodes_to_the_same_floats(client):
    # The JSON floats are float32 in their shortest form: read as float32, the very bytes base64 carries.
    floats = [struct.pack("<384f", *v) for v in vectors(client, ["one", "two"], encoding_format="float")]
    coded = client.embeddings.create(model=MODEL, input=["one", "two"], encoding_format="base64").data
    assert [base64.b64decode(d.embedding) for d in coded] == floats
    # the client's default: it asks for base64 and decodes it
    assert [struct.pack("<384f", *v) for v in vectors(client, ["one", "two"])] == floats


def test_token_arrays_give_the_texts_vectors(client, embedding_service):
    tokens = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in the model's own vocabulary
    assert cosine(vectors(client, tokens)[0], vectors(client, "hello world")[0]) >= 0.9999


def test_a_chat_model_asked_for_embeddings_or_the_reverse_gets_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="smollm2-135m-instruct", input="hi")
    assert raised.value.body["code"] == "model_kind_mismatch" and MODEL in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["code"] == "model_kind_mismatch" and "smollm2-135m-instruct" in raised.value.body["message"]


@pytest.mark.parametrize("inputs,status,code", [
    ("", 400, "invalid_value"),
    ([], 400, "invalid_value"),
    (["x"] * 10_000, 400, "invalid_value"),
    ("word " * 600, 400, "context_length_exceeded"),
])
def test_bad_inputs_get_clear_4xx(embedding_service, inputs, status, code):
    import requests

    r = requests.post(embedding_service.url + "/v1/embeddings", json={"model": MODEL, "input": inputs}, timeout=60)
    error = assert_openai_error(r, status, code, "input")
    assert error["message"]


def test_a_request_of_2048_inputs_stalls_no_chat_or_small_request(embedding_service, client):
    big_done = []
    big = threading.Thread(target=lambda: big_done.append(vectors(client, [f"sentence number {i}" for i in range(2048)])))
    big.start()
    try:
        time.sleep(1.0)
        start = time.monotonic()
        assert len(vectors(client, "a small one")[0]) == 384
        small_s = time.monotonic() - start
        reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content is not None
    finally:
        big.join(timeout=300)
    assert len(big_done[0]) == 2048
    assert small_s < 5.0, f"a one-sentence request took {small_s:.1f} s beside a 2048-input one"


def test_rows_record_the_sha256_of_input_and_vectors(embedding_service, client):
    import hashlib

    coded = client.embeddings.create(model=MODEL, input=["log me"], encoding_format="base64")
    row = embedding_service.last_row()
    assert row["endpoint"] == "/v1/embeddings" and row["status"] == 200 and row["model"] == MODEL
    data = base64.b64decode(coded.data[0].embedding)
    assert row["response_sha256"] == hashlib.sha256(data).hexdigest() and row["prompt_tokens"] == 4


def test_the_converted_gguf_is_cached_and_verified(embedding_service):
    gguf = embedding_service.home / "converted" / bundled_embedding.GGUF_NAME
    assert gguf.is_file() and bundled_embedding.recorded_sha256(gguf)
    assert "convert (ok" in embedding_service.output()


# -- the converter against the fp32 model --------------------------------------------------------------------
def fp32_vectors(folder, tokenizer):
    """SENTENCES through the fp32 safetensors in transformers, mean-pooled and normalised: sentence-transformers' math."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


@pytest.mark.parametrize("out_type", ["F32", "F16"])
def test_the_converted_model_matches_fp32_sentence_transformers_math(tmp_path, out_type):
    """GGUF (the bundled F32, and F16) through llama.cpp against the fp32 safetensors in transformers with mean
    pooling: the same tokens, and cosine >= 0.999 for every sentence."""
    import zipfile

    import numpy as np
    from transformers import AutoTokenizer

    from appliance.backends.embedding import create_embedder
    from models.embedding_gguf import convert

    source = bundled_embedding.source_zip()
    folder = tmp_path / "hf"
    zipfile.ZipFile(source).extractall(folder)
    gguf = convert(source, tmp_path / "minilm.gguf", out_type=out_type)
    engine = create_embedder("gguf", gguf, threads=2, context_length=512)
    engine.load()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert [engine.tokenize(s) for s in SENTENCES] == [tokenizer(s)["input_ids"] for s in SENTENCES]
        ours = np.frombuffer(engine.embed([engine.tokenize(s) for s in SENTENCES]), dtype="<f4").reshape(len(SENTENCES), -1)
    finally:
        engine.close()
    assert (ours * fp32_vectors(folder, tokenizer)).sum(axis=1).min() >= 0.999


# -- the pipeline's package --------------------------------------------------------------------------------
def test_the_pipeline_exports_an_int8_package_that_the_box_serves(tmp_path):
    """distill.export_embedding: Q8_0 GGUF, manifest of kind embedding, a report against fp32 that meets the goal;
    a box whose default model is that package serves it at /v1/embeddings and still finds a chat model."""
    import json

    import requests

    from distill.export_embedding import export
    from models.catalog import find_model, verify_model
    from models.manifest import read_manifest

    folder = export(bundled_embedding.source_zip(), tmp_path / "pkg", "minilm-q8", "Q8_0")
    manifest = read_manifest(folder)
    assert manifest.kind == "embedding" and manifest.quantization == "Q8_0" and manifest.architecture == "bert"
    report = json.loads((folder / "report.json").read_text())
    assert report["pairs"] >= 200 and report["spearman_vs_fp32"] >= 0.99 and report["meets_goal"], report
    entry = find_model(str(folder))
    assert entry.kind == "embedding" and verify_model(entry)[0]
    svc = start_service(tmp_path / "home", extra_env={"APPLIANCE_MODEL": str(folder)})
    try:
        r = requests.post(svc.url + "/v1/embeddings", json={"input": ["one", "two"]}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "minilm-q8" and len(r.json()["data"][0]["embedding"]) == 384
        chat = requests.post(svc.url + "/v1/chat/completions", timeout=120,
                             json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["model"] == "smollm2-135m-instruct"
    finally:
        svc.stop()


def test_the_pipeline_exports_an_onnx_package_that_onnx_runtime_serves_like_fp32(tmp_path):
    """distill.export_embedding --format onnx: the graph with its pooling, F32; its vectors against fp32 transformers
    (cosine >= 0.9999, the same tokens), the same alone as in a batch of mixed lengths, and served by a box whose
    default model is the package, asked with the openai client."""
    import json
    import zipfile

    import numpy as np
    import openai
    from transformers import AutoTokenizer

    from appliance.backends.embedding import create_embedder
    from distill.export_embedding import export
    from models.manifest import read_manifest

    folder = export(bundled_embedding.source_zip(), tmp_path / "pkg", "minilm-onnx", "F32", fmt="onnx")
    manifest = read_manifest(folder)
    assert manifest.kind == "embedding" and manifest.format == "onnx" and manifest.quantization == "F32"
    assert json.loads((folder / "report.json").read_text())["min_cosine_vs_fp32"] >= 0.9999

    hf = tmp_path / "hf"
    zipfile.ZipFile(bundled_embedding.source_zip()).extractall(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    engine = create_embedder("onnx", folder, threads=2, context_length=512)
    engine.load()
    try:
        assert [engine.tokenize(s) for s in SENTENCES] == [tokenizer(s)["input_ids"] for s in SENTENCES]
        rows = engine.embed([engine.tokenize(s) for s in SENTENCES])
        ours = np.frombuffer(rows, dtype="<f4").reshape(len(SENTENCES), -1)
        alone = np.stack([np.frombuffer(engine.embed([engine.tokenize(s)]), dtype="<f4") for s in SENTENCES])
    finally:
        engine.close()
    reference = fp32_vectors(hf, tokenizer)
    assert (ours * reference).sum(axis=1).min() >= 0.9999
    assert (ours * alone).sum(axis=1).min() >= 0.9999  # padding in a batch changes no vector

    svc = start_service(tmp_path / "home", extra_env={"APPLIANCE_MODEL": str(folder)})
    try:
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
        served = client.embeddings.create(model="minilm-onnx", input=SENTENCES[:3])
        assert served.model == "minilm-onnx" and len(served.data) == 3
        assert min(cosine(d.embedding, r) for d, r in zip(served.data, reference[:3].tolist())) >= 0.9999
        with pytest.raises(openai.BadRequestError):  # still an embedding model: no chat
            client.chat.completions.create(model="minilm-onnx", messages=[{"role": "user", "content": "Hi"}])
    finally:
        svc.stop()
