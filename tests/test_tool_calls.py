"""Tool calling on the real model, on both engines, through the real openai client: a named tool_choice forces a
call whose arguments validate against the tool's schema, streamed deltas reassemble into the same call, and the
tool's result comes back for a final answer. SmolLM2's template knows no tools: this is the default prompt's path."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.helpers import MODEL

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}


def test_a_named_tool_choice_forces_a_call_whose_arguments_follow_the_schema(openai_client):
    for seed in range(5):
        reply = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[CLOCK, WEATHER],
                                                      tool_choice=FORCE, temperature=1.0, seed=seed, max_tokens=80)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(openai_client):
    body = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80)
    whole = openai_client.chat.completions.create(**body).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in openai_client.chat.completions.create(stream=True, **body):
        for part in chunk.choices[0].delta.tool_calls or []:
            name, arguments = calls.get(part.index, ("", ""))
            calls[part.index] = (name + (part.function.name or ""), arguments + (part.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls.values()) == [(c.function.name, c.function.arguments) for c in whole]


def test_a_round_trip_call_result_and_final_answer(openai_client, service):
    first = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=FORCE,
                                                  temperature=0, max_tokens=80).choices[0].message
    (call,) = first.tool_calls
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    final = openai_client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0,
                                                  max_tokens=60).choices[0]
    assert final.finish_reason in ("stop", "length") and final.message.content and not final.message.tool_calls
    assert "get_weather" in service.rows()[-2]["response"]  # the call is logged as the model wrote it
