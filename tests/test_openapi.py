"""/openapi.json: every route documented, request bodies exactly the validating pydantic models, and
schemathesis finding no server error and no response off the document: on the fake engine in-process
(fast), and against a real `appliance serve` with the real model (slow), both bounded and seeded."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from appliance.api.embeddings import EmbeddingRequest
from appliance.api.openapi import REF, SKIPPED_METHODS
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, PowerRequest
from tests.helpers import start_service

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture
def box(make_box):  # noqa: F811
    return make_box()


@pytest.fixture
def document(box) -> dict:
    r = box.client.get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    return r.get_json()


def test_every_route_is_in_the_document(box, document):
    assert document["openapi"] == "3.1.0"
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    for rule in box.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - SKIPPED_METHODS:
            assert (path, method.lower()) in documented, f"{method} {rule.rule} is not in /openapi.json"
    assert len(documented) == sum(len(r.methods - SKIPPED_METHODS) for r in box.app.url_map.iter_rules())


@pytest.mark.parametrize("path, model", [
    ("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
    ("/api/power", PowerRequest), ("/v1/embeddings", EmbeddingRequest),
])
def test_request_bodies_are_the_validating_models(document, path, model):
    body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": REF.format(model=model.__name__)}
    schema = model.model_json_schema(ref_template=REF)
    components = document["components"]["schemas"]
    for name, definition in schema.pop("$defs", {}).items():
        assert components[name] == definition
    assert components[model.__name__] == schema


def test_errors_have_the_openai_shape_in_the_document(document):
    for path, item in document["paths"].items():
        for method, op in item.items():
            for status in ("4XX", "5XX"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": REF.format(model="Error")}, (method, path)


def test_schemathesis_loads_it_as_valid_openapi(document):
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in document["paths"].values())


# What schemathesis found: ?limit=false (or any non-number) silently listed 50 rows.
@pytest.mark.parametrize("path", ["/api/logs", "/api/power/events"])
@pytest.mark.parametrize("limit", ["false", "", "1.5", "٣", "9" * 19])
def test_a_limit_that_is_not_a_whole_number_is_a_400(box, path, limit):
    r = box.client.get(path, query_string={"limit": limit})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "limit", r.get_data(as_text=True)


def test_a_numeric_limit_is_held_to_1_to_1000(box):
    for _ in range(3):
        box.client.post("/v1/completions", json={"prompt": "x"})
    assert [len(box.client.get("/api/logs", query_string={"limit": n}).get_json()["data"]) for n in
            ("-5", "0", "2", "+2", "5000")] == [1, 1, 2, 2, 3]


# -- fuzzing ------------------------------------------------------------------------------------
# Schemathesis's own pytest loader (schemathesis.pytest.from_fixture) breaks on pytest 9.2 (it reads
# Function._nodeid), so each operation runs as a plain Hypothesis test over the operation's strategy.
def fuzz(schema, max_examples: int, budget: float | None = None, max_tokens: int | None = None,
         **call) -> tuple[list[str], Counter]:
    """Every operation, positive then negative cases, each sent and checked: the failures, and the cases sent.

    ``max_tokens``: lower a valid generation request's max_tokens to this (a real model on a busy
    2-core box makes about 2 tokens a second; the schema allows the whole context).

    ``budget``: seconds for each operation and mode; past it the remaining cases are not sent (one already
    sent runs to its end), so a run lasts at most about (budget + one request) x operations x 2.
    """
    failures, sent = [], Counter()
    operations = sorted((result.ok() for result in schema.get_all_operations()),
                        key=lambda op: (not op.path.startswith("/v1/"), op.path, op.method))
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            started = time.monotonic()

            @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                if budget is not None and time.monotonic() - started > budget:
                    return
                sent[operation.label] += 1
                body = case.body
                if max_tokens and mode is GenerationMode.POSITIVE and operation.path.startswith("/v1/") \
                        and isinstance(body, dict):
                    body["max_tokens"] = min(body.get("max_tokens") or max_tokens, max_tokens)
                try:
                    case.call_and_validate(checks=CHECKS, **call)
                except (Exception, FailureGroup) as exc:  # kept as found: a real model's replay may answer otherwise
                    failures.append(f"{operation.label} ({mode.value}): {exc}")

            try:
                check()
            except Unsatisfiable:  # no parameters and no body: nothing to make invalid
                assert mode is GenerationMode.NEGATIVE, operation.label
    return failures, sent


def test_schemathesis_on_the_fake_engine(box):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", box.app)
    failures, sent = fuzz(schema, max_examples=25)
    assert not failures, "\n\n".join(failures)
    assert len(sent) == len(list(schema.get_all_operations()))  # all but /openapi.json, which schemathesis skips
    statuses = Counter(row["status"] for row in box.rows())
    assert statuses[200] and statuses[400]  # both answers and refusals were exercised


@pytest.mark.slow
def test_schemathesis_on_the_real_model(tmp_path):
    # A small context keeps prompts short and refusals of long ones cheap.
    svc = start_service(tmp_path / "home", extra_env={"APPLIANCE_CONTEXT_LENGTH": "128", "APPLIANCE_PARALLEL": "2"})
    try:
        schema = schemathesis.openapi.from_url(svc.url + "/openapi.json")
        failures, sent = fuzz(schema, max_examples=8, budget=30, max_tokens=24, timeout=120)
        rows = svc.rows()
    finally:
        svc.stop()
    assert not failures, "\n\n".join(failures)
    assert sent["POST /v1/chat/completions"] and sent["POST /v1/completions"] and sent["POST /v1/embeddings"]
    assert any(row["status"] == 200 and row["completion_tokens"] for row in rows)  # the real model answered
    assert not [row for row in rows if row["status"] >= 500], "server errors in the request log"
