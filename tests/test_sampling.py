"""Sampling options on the real model, on both engines: the ban of logit_bias, penalties that work in
the expected direction, and the bundled model's own defaults."""

from __future__ import annotations

import pytest
import requests

from models import find_model
from tests.helpers import MODEL

pytestmark = pytest.mark.slow

REPEATING = "Once upon a time, there was a cat. The cat"  # greedy, it goes on: "was a cat. The cat was never a cat..."


def token_id(text: str) -> int:
    """The id of a one-token text in SmolLM2's vocabulary (the GGUF and the ONNX export share it)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(find_model(MODEL).path), vocab_only=True, verbose=False)
    (token,) = llm.tokenize(text.encode(), add_bos=False, special=False)
    return token


def complete(service, prompt: str, **options) -> str:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0} | options
    r = requests.post(service.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_banned_token_never_appears(service):
    prompt = "The capital of France is"
    assert "Paris" in complete(service, prompt)
    banned = complete(service, prompt, logit_bias={str(token_id(" Paris")): -100})
    assert "Paris" not in banned.split(".")[0] and " Paris" not in banned, banned


def test_penalties_push_away_from_what_was_already_said(service):
    no_penalty = {"repeat_penalty": 1.0}  # as the default, said again so the test holds whatever the default
    plain = complete(service, REPEATING, max_tokens=24, **no_penalty)
    assert plain.count("cat") >= 3, plain
    for option in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repeat_penalty": 1.8}):
        penalized = complete(service, REPEATING, max_tokens=24, **(no_penalty | option))
        assert penalized.count("cat") < plain.count("cat"), (option, penalized)


def test_the_bundled_models_own_defaults_are_listed_and_answer_sensibly(service):
    if service.backend != "llama.cpp":
        pytest.skip("the defaults are the bundled GGUF's catalog entry; the ONNX export is a package of its own")
    defaults = requests.get(service.url + "/v1/models", timeout=10).json()["data"][0]["appliance"]["sampling_defaults"]
    assert (defaults["temperature"], defaults["top_p"], defaults["repeat_penalty"]) == (0.1, 0.9, 1.0)
    r = requests.post(service.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 24, "seed": 3})
    assert "4" in r.json()["choices"][0]["message"]["content"]
