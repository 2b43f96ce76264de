"""POST /v1/embeddings in the OpenAI shape, served by the box's embedding models.

``input`` is a string, a list of strings, a token array or a list of token arrays; a token array is the
exact sequence the model reads (for a BERT model, with its [CLS] and [SEP] ids, as its tokenizer gives
them). The inputs of one request are batched together in the runner; the request takes the same queue,
priority classes, keys and token buckets as a chat request (``appliance.embedding``) and is logged with
the sha256 of its input and of its vectors. Nothing is truncated: an input longer than the model's
context is a 400 naming it. ``dimensions`` is refused unless it is the model's own length: the bundled
all-MiniLM-L6-v2 was not trained for shorter vectors (no Matryoshka training), so cutting them would
quietly lose quality.
"""

from __future__ import annotations

import base64
import json
from typing import Literal, Union

import numpy as np
import orjson
from flask import Blueprint, Response, g, request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance import auth
from appliance.api import request_log
from appliance.api.schemas import parse_body
from appliance.embedding import Embedding
from appliance.errors import InvalidRequest
from appliance.pool import PooledModel
from appliance.runner import protocol as msg
from appliance.state import state
from models.kinds import EMBEDDING

bp = Blueprint("embeddings", __name__, url_prefix="/v1")
request_log.attach(bp)

MAX_INPUTS = 2048  # inputs per request, as OpenAI takes


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Union[str, list[str], list[int], list[list[int]]] = Field(
        description=f"a string, a list of up to {MAX_INPUTS} strings, a token array or a list of token arrays; "
                    "none may be empty", json_schema_extra={"minLength": 1, "minItems": 1, "maxItems": MAX_INPUTS})
    model: str | None = Field(None, description="an embedding model's name or alias; the box's first embedding "
                                                "model when omitted")
    encoding_format: Literal["float", "base64"] = Field("float", description="floats, or base64 of the float32 "
                                                                             "little-endian bytes")
    dimensions: int | None = Field(None, ge=1, description="only the model's own vector length is accepted")
    user: str | None = None
    priority: str | None = Field(None, description="priority class name; the X-Priority header does the same")

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not items:
            raise ValueError("is empty: send at least one text or token array")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"holds {len(items)} inputs; at most {MAX_INPUTS} are accepted per request: "
                             "split them over several requests")
        for i, item in enumerate(items):
            if len(item) == 0:
                raise ValueError(f"input[{i}] is empty: every text and token array needs some content")
        return value

    @property
    def inputs(self) -> list:
        """Every input as a text or a tuple of token ids."""
        value = self.input
        if isinstance(value, str) or isinstance(value[0], int):
            value = [value]
        return [item if isinstance(item, str) else tuple(item) for item in value]


@bp.post("/embeddings")
def embeddings():
    """Embeddings of one or more inputs (OpenAI-compatible)"""
    req = parse_body(request.get_data(), EmbeddingRequest)
    inputs = req.inputs
    _check_sizes(inputs)
    model = state().models.get(req.model, kind=EMBEDDING)
    g.logged_request.describe(model.name, json.dumps(req.input, ensure_ascii=False), stream=False)
    if req.dimensions is not None:
        _check_dimensions(req.dimensions, state().models.describe(model).get("dimensions"), model.name)
    vectors = _run(req, model, inputs)
    _check_dimensions(req.dimensions, vectors.dimensions, model.name)  # where only the loaded engine knew it
    body = response_json(model.name, vectors, len(inputs), req.encoding_format, g.logged_request.generation)
    # orjson writes each float32 in the fewest digits that read back to it: the stdlib writes float32 values as
    # 17-digit doubles, 14 ms for 32 vectors of 384 and twice the bytes, a tenth of what the engine takes for them.
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), mimetype="application/json")


def _check_sizes(inputs: list) -> None:
    """Refuse a text that cannot fit before spending time to tokenize it (as a prompt is)."""
    limit = state().settings.prompt_chars_limit
    for i, item in enumerate(inputs):
        if isinstance(item, str) and len(item) > limit:
            raise InvalidRequest(f"input[{i}] is {len(item)} characters; at most {limit} are accepted per input "
                                 "(max_prompt_chars), and no more can fit the model's context. Shorten or split it.",
                                 param="input", code="input_too_long", status=413)


def _check_dimensions(dimensions: int | None, own: int | None, name: str) -> None:
    if dimensions is not None and own is not None and dimensions != own:
        raise InvalidRequest(f"dimensions={dimensions}: model {name!r} makes vectors of {own} numbers and was "
                             "not trained for shorter ones; leave dimensions out (or send its own length)",
                             param="dimensions", code="invalid_value")


def _run(req: EmbeddingRequest, model: PooledModel, inputs: list) -> msg.Vectors:
    pool, logged = state().models, g.logged_request
    job = Embedding(model.runner, model.admission, logged.started, logged.cancel, client=auth.client_id(),
                    limits=auth.client_limits(), load=lambda: pool.load(model),
                    priority=auth.request_priority(req.priority or request.headers.get("X-Priority"),
                                                   model.admission.classes))
    job.start(None, None, msg.EmbedParams(tuple(inputs)))  # until it is admitted, errors are plain responses
    logged.generation = job
    job.run_to_end()
    return job.result


def response_json(model: str, vectors: msg.Vectors, count: int, encoding: str, job: Embedding) -> dict:
    width = 4 * vectors.dimensions
    chunks = [vectors.data[i * width : (i + 1) * width] for i in range(count)]
    data = [{"object": "embedding", "index": i, "embedding": _encode(chunk, encoding)} for i, chunk in enumerate(chunks)]
    tokens = job.usage.prompt_tokens
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode(chunk: bytes, encoding: str) -> np.ndarray | str:
    if encoding == "base64":  # what OpenAI sends: the float32 little-endian bytes
        return base64.b64encode(chunk).decode("ascii")
    return np.frombuffer(chunk, dtype="<f4")
