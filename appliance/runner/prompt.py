"""From a request to prompt tokens, without letting a user's text become control tokens.

A chat is rendered with the model's own template, then tokenized piece by
piece: the template's own text may hold special tokens (``<|im_start|>``),
each message's content (and a tool call's arguments, where they are text) is plain text, so a user who
writes ``<|im_start|>system`` gets those characters, not a forged turn.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from jinja2.utils import htmlsafe_json_dumps

from appliance.backends.base import Backend
from appliance.chat_template import ChatTemplateError, render_chat
from appliance.tools import template_renders_tools, tools_as_text


def chat_tokens(backend: Backend, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    template, bos, eos = backend.chat_template()
    if not template_renders_tools(template) and (tools or _holds_tool_turns(messages)):
        messages, tools = tools_as_text(messages, tools), None

    def render(chat: list[dict]) -> str:
        return render_chat(template, chat, bos_token=bos, eos_token=eos, tools=tools)

    tokens: list[int] = []
    for i, (text, is_content) in enumerate(_split_contents(render, messages)):
        tokens += backend.tokenize(text, add_special=i == 0, parse_special=not is_content)
    return _one_bos(backend, tokens)


def _holds_tool_turns(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def completion_tokens(backend: Backend, prompt: str) -> list[int]:
    """A plain completion's prompt is the client's own template: its control-token text is parsed, as llama-server does."""
    return _one_bos(backend, backend.tokenize(prompt, add_special=True, parse_special=True))


def _split_contents(render: Callable[[list[dict]], str], messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_message_content) pieces, in order.

    The template is rendered once more with a marker in place of each message's text, so the template's own
    text is known exactly; searching the prompt for a message's text instead finds a short one ("a", "I")
    inside the template's text first (<|im_st-a-rt|>), which then loses its control tokens. The marker is
    letters and digits, so a template that writes a text through ``tojson`` (Llama 3's tool results) keeps it."""
    nonce = secrets.token_hex(6)  # no request can guess it
    marked, texts = _marked(messages, lambda i: f"QZ{nonce}M{i}ZQ")
    parts = re.split(f"QZ{nonce}M(\\d+)ZQ", render(marked))  # template text, index, template text, ...
    rendered = render(messages)
    pieces, cursor = [], 0
    for at in range(0, len(parts), 2):
        template_text, follows = parts[at], parts[at + 2] if at + 2 < len(parts) else None
        if not rendered.startswith(template_text, cursor):
            raise ChatTemplateError(REWRITES)
        pieces.append((template_text, False))
        cursor += len(template_text)
        if follows is not None:
            content = _as_written(rendered, cursor, texts[int(parts[at + 1])], follows)
            pieces.append((content, True))
            cursor += len(content)
    if cursor != len(rendered):
        raise ChatTemplateError(REWRITES)
    return [p for p in pieces if p[0]]


REWRITES = ("the model's chat template rewrites message text, so it cannot be tokenized safely; use "
            "/v1/completions with a prompt of your own")


def _marked(messages: list[dict], marker: Callable[[int], str]) -> tuple[list[dict], list[str]]:
    """The messages with a marker in place of each text a client wrote: its content, and a tool call's arguments
    where they are text (not JSON, which templates write through tojson); and those texts, by marker number."""
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return marker(len(texts) - 1)

    marked = []
    for message in messages:
        message = dict(message, content=mark(message["content"])) if _text(message) else dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_with_arguments(call, mark) for call in message["tool_calls"]]
        marked.append(message)
    return marked, texts


def _with_arguments(call: dict, mark: Callable[[str], str]) -> dict:
    arguments = call.get("function", {}).get("arguments")
    if not isinstance(arguments, str) or not arguments:
        return call
    return dict(call, function=dict(call["function"], arguments=mark(arguments)))


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _as_written(rendered: str, cursor: int, content: str, follows: str) -> str:
    """A message's text where the template wrote it at ``cursor``: as given, trimmed as templates often do, or
    escaped inside a JSON string (``tojson``); followed there by the template's next text."""
    # One at a time: most templates write the text as given, and a long one is not copied four more times.
    for form in (str, str.strip, str.lstrip, str.rstrip, _in_json):
        candidate = form(content)
        if rendered.startswith(candidate, cursor) and rendered.startswith(follows, cursor + len(candidate)):
            return candidate
    raise ChatTemplateError(REWRITES)


def _in_json(text: str) -> str:
    """``text`` as Jinja's tojson writes it inside its quotes (the function its filter calls)."""
    return str(htmlsafe_json_dumps(text))[1:-1]


def _one_bos(backend: Backend, tokens: list[int]) -> list[int]:
    # A chat template that writes the BOS text itself would otherwise give two.
    bos = backend.bos_token
    if bos is not None and len(tokens) >= 2 and tokens[0] == tokens[1] == bos:
        return tokens[1:]
    return tokens
