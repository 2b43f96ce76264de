"""Structured outputs on the real model, on both engines, through the real openai client: constrained decoding
gives JSON that parses and validates, streamed or not, at temperature 1; what the engine cannot follow is a 400."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import requests

from tests.helpers import MODEL, assert_openai_error

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "role": {"enum": ["engineer", "nurse", "teller"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 24}, "floor": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["city", "floor"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "role", "address", "skills"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe one worker at our site as JSON."}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def ask(client, stream: bool, **options) -> tuple[str, str]:
    """(the answer's text, its finish_reason)."""
    body = {"model": MODEL, "messages": ASK, "temperature": 1.0, "max_tokens": 160} | options
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **body):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_answers_validate_20_times_out_of_20_at_temperature_1(openai_client, stream):
    with ThreadPoolExecutor(4) as pool:  # batched: four constrained sequences share each step
        answers = list(pool.map(lambda seed: ask(openai_client, stream, seed=seed, response_format=PERSON_FORMAT),
                                range(20)))
    for text, finish in answers:
        assert finish == "stop", (finish, text)
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for text, _ in answers}) > 1, "temperature 1 with 20 seeds gave one answer: nothing was sampled"


def test_json_object_gives_an_object_where_free_text_does_not(openai_client):
    options = {"seed": 1, "temperature": 0, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    free, _ = ask(openai_client, False, **options)
    with pytest.raises(ValueError):
        json.loads(free)  # without the constraint this model answers in prose
    text, finish = ask(openai_client, False, response_format={"type": "json_object"}, **options)
    assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_a_constrained_answer_cut_by_max_tokens_ends_with_length(openai_client):
    text, finish = ask(openai_client, False, seed=2, response_format=PERSON_FORMAT, max_tokens=6)
    assert finish == "length"
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_gbnf_grammar_is_followed(service):
    gbnf = 'root ::= ("yes" | "no") "." '
    r = requests.post(service.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Is the sky green?"}], "grammar": gbnf, "temperature": 1.0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("yes.", "no.")


@pytest.mark.parametrize("fmt, param, named", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema", "strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
     "response_format.json_schema.schema", "nowhere"),
    ({"type": "json_schema"}, "response_format", "json_schema"),
    ({"type": "yaml"}, "response_format.type", None),
])
def test_a_schema_the_engine_cannot_follow_is_a_400_naming_the_part(service, fmt, param, named):
    r = requests.post(service.url + "/v1/chat/completions", timeout=30,
                      json={"messages": ASK, "response_format": fmt})
    error = assert_openai_error(r, 400, param=param)
    if named:
        assert named in error["message"], error
