"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Strict types ("5" is not an int) and unknown fields refused, as OpenAI does,
so a client learns about a typo instead of getting silently ignored options.
"""

from __future__ import annotations

import json
import math
import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.errors import InvalidRequest


# llama.cpp seeds are uint32 and 0xFFFFFFFF means "pick one at random".
MAX_SEED = 2**32 - 2
# Longer integer literals are refused while parsing: no field needs one, and past 4300 digits
# Python's int() raises a ValueError (a 500) whatever sys.set_int_max_str_digits says elsewhere.
MAX_INT_DIGITS = 100


MAX_TOP_K = 1_000_000  # more than any vocabulary; the engines take a 32-bit int
MAX_STOP_CHARS = 1000  # every generated token is matched against each stop string
MAX_LOGIT_BIAS = 1024  # biased tokens per request (OpenAI takes 300)
MAX_GRAMMAR_CHARS = 100_000
MAX_TOOLS = 128
MAX_N = 16
MAX_TOP_LOGPROBS = 20  # as OpenAI


class FieldError(InvalidRequest):
    """Fields that do not work together: a 400 naming the field (raised while the body is validated)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}", param=param, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class StreamOptions(_Strict):
    include_usage: bool = False


# Names and ids reach the prompt as the template's own text, whose control tokens are parsed: none may spell one.
NAME = r"^[A-Za-z0-9_-]{1,64}$"
CALL_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class ToolCallFunction(_Strict):
    name: str = Field(pattern=NAME)
    arguments: str = Field(description="the arguments as JSON text, as the model wrote them")


class ToolCallMessage(_Strict):
    id: str = Field(pattern=CALL_ID)
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(_Strict):
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="who wrote the message; tool: the result of a tool call, naming it by tool_call_id")
    content: Union[str, list[TextPart], None] = Field(None, description="the text; only an assistant message that "
                                                      "holds tool_calls may leave it out")
    name: str | None = Field(None, pattern=NAME)
    tool_calls: list[ToolCallMessage] | None = Field(None, description="an assistant's earlier tool calls")
    tool_call_id: str | None = Field(None, pattern=CALL_ID, description="a tool message: the call it answers")

    def model_post_init(self, __context) -> None:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages hold tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) or self.content is None else "".join(
            p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": text}
        if self.tool_calls:
            # Chat templates (Qwen's, Hermes') write arguments with tojson: they take an object, not JSON text.
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(_Strict):
    name: str = Field(pattern=NAME, description="what the model calls it by")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of the arguments; none: any object")
    strict: bool | None = Field(None, description="always followed when a call is required or named")


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=NAME, description="the schema's name, as OpenAI takes it")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="a JSON Schema the output validates against; "
                                 "none: any JSON object")
    strict: bool | None = Field(None, description="always followed here: decoding is constrained either way")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: free text; json_object: any JSON object; json_schema: JSON valid against json_schema")
    json_schema: JsonSchemaFormat | None = None
    schema_: dict | None = Field(None, alias="schema", description="llama-server-style extension: with json_object, "
                                 "the schema the object validates against")

    def model_post_init(self, __context) -> None:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object: {\"name\": ..., \"schema\": {...}}")


class _GenerationRequest(_Strict):
    model: str | None = Field(None, description="model name; the served model when omitted")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate; the rest of the context when omitted")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="llama.cpp-style extension; 0 disables it")
    # json_schema_extra: what the validators below check, told to /openapi.json (each keyword applies to its type).
    stop: Union[str, list[str], None] = Field(None, description="up to 16 strings that end the generation",
                                              json_schema_extra={"maxItems": 16, "maxLength": MAX_STOP_CHARS,
                                                                 "items": {"maxLength": MAX_STOP_CHARS}})
    seed: int | None = Field(None, description=f"same seed + same request = same output; 0 to {MAX_SEED}",
                             json_schema_extra={"minimum": 0, "maximum": MAX_SEED})
    n: int = Field(1, ge=1, le=MAX_N, description="choices: answers sampled from one prefill of the prompt, each "
                   "holding a slot (at most the model's parallel setting)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="llama.cpp-style extension: drop tokens less "
                                "likely than min_p times the likeliest; 0 disables it")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="lowers the logit of every token this "
                                           "answer already holds (OpenAI's meaning), within repeat_last_n")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="lowers a token's logit by this times "
                                            "how often this answer already holds it, within repeat_last_n")
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0, description="llama.cpp-style extension: divides "
                                         "the logit of a token this answer already holds (1 disables it)")
    repeat_last_n: int | None = Field(None, ge=-1, le=1_000_000, description="llama.cpp-style extension: how many "
                                      "of the latest generated tokens the penalties look at (0: none, -1: all)")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias added to its logit, -100 to "
                                                "100; -100 bans the token",
                                                json_schema_extra={"maxProperties": MAX_LOGIT_BIAS,
                                                                   "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                                                   "additionalProperties": {"minimum": -100,
                                                                                            "maximum": 100}})
    response_format: ResponseFormat | None = Field(None, description="constrain the output to JSON: every answer "
                                                   "parses, and validates against the schema if one is given")
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS, description="llama.cpp-style extension: a GBNF "
                                "grammar (or a Lark one, as llguidance reads it) the output follows")
    priority: str | None = Field(None, description="priority class name (see the priority_classes setting); the X-Priority header does the same")
    keep_alive: float | str | None = Field(None, description="how long the model stays loaded after this request, as Ollama takes it: seconds, or a duration such as '30s', '10m', '1h' (0: unload when done); never longer than the box's keep_alive")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value):
        if value is None:
            return value
        seconds = parse_duration(value)
        if seconds < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return seconds

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_fits_the_engines(cls, value):
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be an integer from 0 to {MAX_SEED}: the engines take a 32-bit seed "
                             f"({MAX_SEED + 1} means random there), and a larger one would be cut to another seed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_biases(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        for token, bias in value.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 9):
                raise ValueError(f"keys are token ids (whole numbers as strings), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"a bias is from -100 to 100, got {bias} for token {token}")
        return value

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), float(bias)) for token, bias in (self.logit_bias or {}).items())

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS, description="functions the model may call")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description="none: answer in text; auto (the default with tools): the model decides; required: "
        "at least one call; a named function: a call of that one. Required and named calls are constrained to "
        "the tool's parameters schema")
    # Off unless asked, as llama-server has it: a small model allowed another call tends to repeat its call
    # until max_tokens.
    parallel_tool_calls: bool = Field(False, description="whether one answer may hold several calls (a named "
                                      "tool_choice is always one call)")
    logprobs: bool = Field(False, description="give each answer token's log-probability under the model")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: also this "
                                     "many likeliest tokens at each place")

    def model_post_init(self, __context) -> None:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools", "two tools have the same name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise FieldError("tool_choice", f"names the tool {self.tool_choice.function.name!r}, which is not in "
                            f"tools ({', '.join(names) or 'none given'})")
        if self.tool_choice == "required" and not names:
            raise FieldError("tool_choice", "is required, but no tools are given")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")

    @property
    def logprobs_top(self) -> int | None:
        """None: no logprobs; n: each token's and the n likeliest."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def calling(self) -> str | None:
        """How this request may call tools: None (it cannot), "auto", "required" or the one tool's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    @property
    def tool_list(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str]] = Field(description="one prompt, or a list holding exactly one",
                                          json_schema_extra={"minLength": 1, "minItems": 1, "maxItems": 1,
                                                             "items": {"minLength": 1}})
    logprobs: int | None = Field(None, ge=0, le=5, description="each token's log-probability and this many "
                                 "likeliest tokens at each place (the completions API's form)")

    @property
    def logprobs_top(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send exactly one prompt per request")
            return value[0]
        return value


class PowerRequest(_Strict):
    state: Literal["active", "idle", "deep_idle"] = Field(description="the power state to move to now")


class ImportRequest(_Strict):
    path: str = Field(min_length=1, description="an exported package tar on this box (appliance models export), e.g. "
                      "on a USB stick mounted there")
    public_key: str | None = Field(None, description="an Ed25519 public key file (PEM) on this box: the tar must be "
                                   "signed by it")


class SwapRequest(_Strict):
    package: str = Field(min_length=1, description="the model to swap in: a catalog name or a package folder on this box")


DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: float | str) -> float:
    """Seconds from a number or a duration such as '30s', '10m', '1h', '250ms'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number of seconds, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("must be seconds or a duration such as '30s', '10m' or '1h'")
    match = re.fullmatch(r"\s*(-?\d{1,9}(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
    if not match:
        raise ValueError(f"must be seconds or a duration such as '30s', '10m' or '1h', got {value!r}")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Parse and validate a JSON body, or raise a 400 that names the bad field."""
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    _refuse_lone_surrogates(data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        code = "missing_field" if first["type"] == "missing" else "invalid_value"
        if first["type"] == "extra_forbidden":
            message, code = f"unrecognized request argument: {param}", "unknown_parameter"
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param, code=code) from None


def _load_json(raw: bytes):
    try:
        return json.loads(raw, parse_int=_bounded_int) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("request body nests JSON arrays or objects too deeply: send a flatter body",
                             code="invalid_json") from None


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidRequest(f"request body holds an integer of {len(digits.lstrip('-'))} digits; "
                             f"numbers may have at most {MAX_INT_DIGITS}", code="invalid_value")
    return int(digits)


def _refuse_lone_surrogates(data) -> None:
    """A \\ud800 escape without its pair parses to a str that cannot be encoded, tokenized or logged."""
    pending = [((), data)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, dict):
            pending += [(where, key) for key in value] + [(where + (key,), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [(where + (i,), item) for i, item in enumerate(value)]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                param = ".".join(map(str, where)) or None
                raise InvalidRequest(
                    f"{param or 'request body'}: text holds a lone UTF-16 surrogate ({value[exc.start]!r} at "
                    f"character {exc.start}), which is not Unicode; escape characters outside the BMP as "
                    "a complete surrogate pair or send them as UTF-8", param=param, code="invalid_value",
                ) from None
