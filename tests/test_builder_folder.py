"""Folders written by onnxruntime-genai's model builder, served by the ONNX backend and the real service.

A tiny random Llama (tests/onnx_models.py) goes through the builder itself (INT4, CPU): GroupQueryAttention,
MatMulNBits, genai_config.json, no config.json. The backend must decode sequences of different lengths in one
batched run with the tokens each gets alone, and the service must answer with the tokens onnxruntime-genai's
own generator picks on the same folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

import requests  # noqa: E402

from appliance.backends import BackendError  # noqa: E402
from appliance.backends.base import SamplingParams  # noqa: E402
from appliance.backends.onnx_runtime import KV_HEADROOM  # noqa: E402
from appliance.runner.prompt import chat_tokens  # noqa: E402
from models.builder_folder import BuilderFolderError, check_graph_inputs  # noqa: E402
from models.catalog import find_model  # noqa: E402
from models.manifest import read_manifest, verify_files  # noqa: E402
from models.registry import add_package  # noqa: E402
from tests.helpers import ServedModel, start_service  # noqa: E402
from tests.onnx_models import build_tiny_llama, build_with_genai_builder  # noqa: E402
from tests.test_onnx_backend import Run, greedy, loaded, run_together  # noqa: E402

QUESTIONS = ["The quick brown fox", "Grüße aus Köln, ein Würfel, ein Bär, ein Fluss.", "Numbers: 1 2 3",
             "Edge boxes answer questions offline, token by token, and emoji 🙂🚀."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def builder_folder(tmp_path_factory):
    """The builder's own output for a tiny random Llama, untouched (tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("genai")
    return build_with_genai_builder(build_tiny_llama(root / "hf"), root / "builder", root / "cache")


@pytest.fixture
def package(builder_folder, tmp_path):
    """A copy of the builder folder registered with ``models add`` (which writes its manifest)."""
    folder = shutil.copytree(builder_folder, tmp_path / "tiny-builder")
    add_package(folder, home=tmp_path / "home", name="tiny-builder")
    return folder


class CountingSession:
    """The backend's onnxruntime session, recording the input_ids shape of every forward pass."""

    def __init__(self, session):
        self.session, self.runs = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def io_binding(self):
        return RecordingBinding(self.session.io_binding())

    def run_with_iobinding(self, binding, *args):
        self.runs.append(binding.input_ids_shape)
        return self.session.run_with_iobinding(binding.binding, *args)


class RecordingBinding:
    def __init__(self, binding):
        self.binding, self.input_ids_shape = binding, None

    def __getattr__(self, name):
        return getattr(self.binding, name)

    def bind_cpu_input(self, name, value):
        if name == "input_ids":
            self.input_ids_shape = tuple(value.shape)
        self.binding.bind_cpu_input(name, value)

    def bind_ortvalue_input(self, name, value):  # a batch decoding in place binds its tokens' array once
        if name == "input_ids":
            self.input_ids_shape = tuple(value.shape())
        self.binding.bind_ortvalue_input(name, value)


def genai_greedy(folder, prompt: list[int], n: int) -> list[int]:
    """onnxruntime-genai's own generator: greedy, up to n new tokens (it stops at end of generation)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.slow
def test_models_add_writes_a_manifest_the_backend_loads(package, tmp_path):
    manifest = read_manifest(package)
    assert (manifest.name, manifest.kind, manifest.format, manifest.architecture) == ("tiny-builder", "chat", "onnx",
                                                                                      "llama")
    assert (manifest.quantization, manifest.target, manifest.context_length) == ("int4-block32-sym", "cpu", 512)
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.name != "manifest.json")
    assert sorted(f.path for f in manifest.files) == on_disk and "model.onnx.data" in on_disk
    for record in manifest.files:
        data = (package / record.path).read_bytes()
        assert (record.size, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    verify_files(package, manifest)
    assert find_model("tiny-builder", home=tmp_path / "home").path == package.resolve()
    facts = loaded(package).load()
    assert (facts.context_length, facts.n_vocab, facts.info["quantization"]) == (512, 400, "int4-block32-sym")


@pytest.mark.slow
def test_sequences_of_different_lengths_decode_in_one_run_with_the_tokens_each_gets_alone(package):
    """Long enough to outgrow the room a batch is packed with (KV_HEADROOM) and be re-packed mid-way."""
    n = KV_HEADROOM + 16
    backend = loaded(package, slots=4, context_length=512)
    backend._session = counting = CountingSession(backend._session)
    run = Run(backend, endless=True)
    for rid, question in enumerate(QUESTIONS[:3]):
        run.submit(rid, SamplingParams(temperature=0, max_tokens=n), question)
    for _ in range(5):
        run.sched.tick()
    run.submit(3, SamplingParams(temperature=0, max_tokens=n), QUESTIONS[3])  # joins mid-way
    run.until_idle()
    prompts = [chat_tokens(backend, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    assert (3, max(len(p) for p in prompts[:3])) in counting.runs  # the first three prompts prefilled in one run
    assert (4, 1) in counting.runs  # four sequences of four different lengths decoded in one run
    alone = [greedy(backend, p, n) for p in prompts]
    assert [run.engine.sampled[rid] for rid in range(4)] == alone
    assert alone == [genai_greedy(package, p, n)[:n] for p in prompts]


@pytest.mark.slow
def test_a_greedy_batch_decodes_through_its_bound_arrays_and_a_sampling_one_through_the_general_step(package):
    """The steady state (the same greedy sequences again, room left in their arrays) skips step's general path,
    which a sampled sequence still takes; the tokens are those each gets alone."""
    n = 12
    backend = loaded(package, slots=2, context_length=512)
    bound_steps = []
    real = backend._decode_bound
    backend._decode_bound = lambda feeds: bound_steps.append(len(feeds)) or real(feeds)
    assert run_together(backend, QUESTIONS[:2], n) == [greedy(backend, chat_tokens(backend, [
        {"role": "user", "content": q}]), n) for q in QUESTIONS[:2]]
    assert bound_steps[:n - 2] == [2] * (n - 2)  # the prefill and the first decode (which binds) go the long way
    bound_steps.clear()
    run = Run(backend, endless=True)
    run.submit(0, SamplingParams(temperature=0.8, seed=3, max_tokens=n), QUESTIONS[0])
    run.until_idle()
    assert len(run.engine.sampled[0]) == n and bound_steps == []


@pytest.mark.slow
def test_a_bound_batch_s_whole_width_mask_gives_each_row_the_logits_of_its_own_tokens(package):
    """The bound batch binds its mask over its arrays' whole width, each row's ones first: GroupQueryAttention must
    take each row's length from the mask's sum, not from its width. Each row's last logits equal those its whole
    sequence gets when scored from an empty past, under a mask exactly as wide as its tokens."""
    import numpy as np

    backend = loaded(package, slots=2, context_length=512)
    generated = run_together(backend, QUESTIONS[:2], 12)
    bound = backend._bound
    assert bound.mask.shape[1] > max(cache.size for cache in bound.caches) + 1  # padding beyond every row
    for slot, tokens in enumerate(generated):
        row = next(r for r, cache in enumerate(bound.caches) if backend._caches[slot] is cache)
        prompt = chat_tokens(backend, [{"role": "user", "content": QUESTIONS[slot]}])
        scored = backend.logits(prompt + tokens[:-1])[-1]
        np.testing.assert_allclose(bound.logits[row, -1], scored, rtol=0, atol=1e-3)
        assert int(bound.best()[row]) == tokens[-1] == int(scored.argmax())


@pytest.mark.slow
def test_the_served_graph_picks_its_logits_positions_and_scores_as_the_package_graph(package):
    """The backend serves the builder's graph changed to run its LM head for the positions it reads
    (ort_graphs.picking_logits), and to give their argmax: a prompt's head and every position's logits (scoring)
    equal the package graph's."""
    import numpy as np
    import onnxruntime as ort

    backend = loaded(package, slots=1, context_length=512)
    assert backend._graph.picks_logits and backend._graph.argmaxes
    prompt = chat_tokens(backend, [{"role": "user", "content": QUESTIONS[1]}])
    original = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([prompt], np.int64), "attention_mask": np.ones((1, len(prompt)), np.int64)}
    for i in original.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, backend._graph.kv_heads, 0, backend._graph.head_dim), np.float32)
    everything = original.run(["logits"], feeds)[0][0]
    np.testing.assert_allclose(backend.logits(prompt), everything, rtol=0, atol=1e-4)
    assert greedy(backend, prompt, 1) == [int(everything[-1].argmax())]


@pytest.mark.slow
def test_prompt_prefilled_in_chunks_continues_as_one_prefill(package):
    """GroupQueryAttention's 'subsequent prompt' path: a chunk after a cached prefix (prefix reuse)."""
    backend = loaded(package, slots=2, context_length=512)
    prompt = chat_tokens(backend, [{"role": "user", "content": QUESTIONS[1]}])
    whole = greedy(backend, prompt, 8)
    backend.start_sequence(1, 0, SamplingParams(temperature=0))
    from appliance.backends.base import Feed

    backend.step([Feed(1, prompt[:5], 0, sample=False)])
    token = backend.step([Feed(1, prompt[5:], 5, sample=True)])[1]
    out = [token]
    while len(out) < 8:
        out.append(backend.step([Feed(1, [out[-1]], len(prompt) + len(out) - 1, sample=True)])[1])
    assert out == whole


@pytest.mark.slow
def test_service_answers_concurrent_requests_with_onnxruntime_genai_greedy_tokens(package, tmp_path):
    backend = loaded(package)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = []
    for m in messages:
        tokens = genai_greedy(package, chat_tokens(backend, m), NEW_TOKENS)
        text = b"".join(backend.token_bytes(t) for t in tokens if not backend.is_end_of_generation(t))
        expected.append(text.decode("utf-8", errors="replace"))
    assert len(set(expected)) > 1  # the answers differ: a wrong prompt or cache would show
    model = ServedModel("onnxruntime", "int4-block32-sym", env={"APPLIANCE_MODEL": "tiny-builder"})
    service = start_service(tmp_path / "home", model=model)
    try:
        with ThreadPoolExecutor(len(messages)) as pool:
            answers = list(pool.map(lambda m: _chat(service.url, m), messages))
    finally:
        service.stop()
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected
    assert all(a["model"] == "tiny-builder" for a in answers)


def _chat(url: str, messages: list[dict]) -> dict:
    body = {"model": "tiny-builder", "messages": messages, "temperature": 0, "max_tokens": NEW_TOKENS}
    response = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


# -- folders the backend cannot serve are refused, saying why ----------------------------------------
def _edit_genai_config(folder, edit) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.slow
@pytest.mark.parametrize("edit, reason", [
    (lambda c: c["model"].update(vision={"filename": "vision.onnx"}), "vision besides its decoder"),
    (lambda c: c["model"]["decoder"]["inputs"].update(inputs_embeds="inputs_embeds"), "inputs_embeds"),
    (lambda c: c["model"]["decoder"].update(sliding_window={"window_size": 64}), "windowed_kv_cache=false"),
])
def test_models_add_refuses_a_builder_option_the_backend_cannot_serve(builder_folder, tmp_path, edit, reason):
    folder = shutil.copytree(builder_folder, tmp_path / "odd")
    _edit_genai_config(folder, edit)
    with pytest.raises(BuilderFolderError, match=reason):
        add_package(folder, home=tmp_path / "home")
    assert not (folder / "manifest.json").exists()


@pytest.mark.slow
def test_a_graph_without_group_query_attention_is_refused_at_add_and_at_load(package, tmp_path):
    import onnx

    graph = onnx.load(str(package / "model.onnx"), load_external_data=False)
    for node in graph.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.op_type = "MultiHeadAttention"
    onnx.save(graph, str(package / "model.onnx"))
    (package / "manifest.json").unlink()
    with pytest.raises(BuilderFolderError, match="uses MultiHeadAttention.*serves builder graphs with GroupQuery"):
        add_package(package, home=tmp_path / "home2")
    with pytest.raises(BackendError, match="uses MultiHeadAttention"):
        from models.builder_folder import write_manifest  # a manifest written by hand gets no further

        write_manifest(package, name="odd", architecture="llama", format="onnx", quantization="int4",
                       target="cpu", context_length=512)
        loaded(package)


def test_a_quantized_kv_cache_or_an_unknown_input_is_refused():
    check_graph_inputs({"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)",
                        "past_key_values.0.key": "tensor(float16)"})
    with pytest.raises(BuilderFolderError, match="tensor\\(int8\\).*kv_cache_quant_scheme"):
        check_graph_inputs({"past_key_values.0.key": "tensor(int8)"})
    with pytest.raises(BuilderFolderError, match="'block_table'"):
        check_graph_inputs({"input_ids": "tensor(int64)", "block_table": "tensor(int32)"})
