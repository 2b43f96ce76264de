"""Bad input gets a 4xx in the OpenAI error shape, never a 500 or a hang, and its log row is kept."""

from __future__ import annotations

import pytest
import requests
from tests.helpers import assert_openai_error

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]

# (id, endpoint, body (dict -> JSON, str/bytes -> sent as is), status, param, code)
BAD_REQUESTS = [
    ("malformed-json", CHAT, "{not json", 400, None, "invalid_json"),
    ("empty-body", CHAT, "", 400, None, "invalid_json"),
    ("json-array", CHAT, "[1, 2]", 400, None, "invalid_json"),
    ("invalid-utf8", CHAT, b"\xff\xfe{}", 400, None, "invalid_json"),
    ("missing-messages", CHAT, {"model": "smollm2"}, 400, "messages", "missing_field"),
    ("messages-not-a-list", CHAT, {"messages": "Hi"}, 400, "messages", "invalid_value"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    ("tool-result-naming-no-call", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0", "invalid_value"),
    ("content-wrong-type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, None, "invalid_value"),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, None, "invalid_value"),
    ("max-tokens-string", CHAT, {"messages": HI, "max_tokens": "10"}, 400, "max_tokens", "invalid_value"),
    ("max-tokens-zero", CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("temperature-negative", CHAT, {"messages": HI, "temperature": -1}, 400, "temperature", "invalid_value"),
    ("stream-not-bool", CHAT, {"messages": HI, "stream": "yes"}, 400, "stream", "invalid_value"),
    ("n-more-than-the-slots", CHAT, {"messages": HI, "n": 5}, 400, "n", "invalid_value"),
    ("too-many-stops", CHAT, {"messages": HI, "stop": [str(i) for i in range(17)]}, 400, "stop", "invalid_value"),
    ("penalty", CHAT, {"messages": HI, "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    ("unknown-field", CHAT, {"messages": HI, "tempreature": 0.5}, 400, "tempreature", "unknown_parameter"),
    ("unknown-model", CHAT, {"model": "gpt-5", "messages": HI}, 404, "model", "model_not_found"),
    ("max-tokens-beyond-context", CHAT, {"messages": HI, "max_tokens": 100_000}, 400, "max_tokens", "context_length_exceeded"),
    ("prompt-beyond-context", COMPLETIONS, {"prompt": "hello " * 6000}, 400, "prompt", "context_length_exceeded"),
    ("messages-beyond-context", CHAT, {"messages": [{"role": "user", "content": "hello " * 6000}]}, 400, "messages", "context_length_exceeded"),
    ("body-too-large", COMPLETIONS, {"prompt": "x" * 5_000_000}, 413, None, "request_entity_too_large"),
    ("missing-prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt", "missing_field"),
    ("several-prompts", COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    ("prompt-wrong-type", COMPLETIONS, {"prompt": 42}, 400, None, "invalid_value"),
    ("nested-10000-deep", CHAT, "[" * 10_000 + "]" * 10_000, 400, None, "invalid_json"),
    ("nested-in-a-field", COMPLETIONS, '{"prompt": "x", "stop": ' + "[" * 10_000 + "]" * 10_000 + "}", 400, None, "invalid_json"),
    ("integer-of-5000-digits", CHAT, '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": ' + "9" * 5000 + "}",
     400, None, "invalid_value"),
    ("lone-surrogate-in-content", CHAT, '{"messages": [{"role": "user", "content": "Hi \\ud800"}]}', 400,
     "messages.0.content", "invalid_value"),
    ("lone-surrogate-in-prompt", COMPLETIONS, '{"prompt": "\\udfff there"}', 400, "prompt", "invalid_value"),
    ("seed-beyond-32-bits", CHAT, {"messages": HI, "seed": 2**32 + 7}, 400, "seed", "invalid_value"),
    ("seed-that-means-random", CHAT, {"messages": HI, "seed": 2**32 - 1}, 400, "seed", "invalid_value"),
    ("n-zero", CHAT, {"messages": HI, "n": 0}, 400, "n", "invalid_value"),
    ("malformed-schema", CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}}, 400,
     "response_format.json_schema.schema", "invalid_schema"),
    ("unsupported-schema-keyword", CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, 400, "response_format.json_schema.schema",
     "invalid_schema"),
    ("tool-without-a-name", CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"parameters": {}}}]},
     400, "tools.0.function.name", "missing_field"),
    ("tool-choice-naming-no-tool", CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "a"}}],
                                          "tool_choice": {"type": "function", "function": {"name": "b"}}}, 400,
     "tool_choice", "invalid_value"),
]


def _post(url: str, body):
    if isinstance(body, (dict, list)):
        return requests.post(url, json=body, timeout=60)
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("name, endpoint, body, status, param, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_a_clear_4xx_and_logged(service, name, endpoint, body, status, param, code):
    response = _post(service.url + endpoint, body)
    error = assert_openai_error(response, status, code, param)
    row = service.last_row()
    assert row["endpoint"] == endpoint
    assert row["status"] == status
    assert row["error"] == error["message"]
    assert row["finished"] is not None


def test_stream_request_with_bad_input_gets_json_error_not_sse(service):
    response = _post(service.url + CHAT, {"messages": HI, "stream": True, "max_tokens": 100_000})
    assert_openai_error(response, 400, "context_length_exceeded")


def test_unknown_route_and_wrong_method_use_the_same_shape(service):
    assert_openai_error(requests.get(service.url + "/v1/nope"), 404, "not_found")
    assert_openai_error(requests.get(service.url + CHAT), 405, "method_not_allowed")


def test_service_still_answers_after_bad_input(service):
    for _, endpoint, body, *_ in BAD_REQUESTS[:5]:
        _post(service.url + endpoint, body)
    r = requests.post(service.url + COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
