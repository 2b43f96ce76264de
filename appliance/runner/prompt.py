"""From a request to prompt tokens, without letting a user's text become control tokens.

A chat is rendered with the model's own template, then tokenized piece by
piece: the template's own text may hold special tokens (``<|im_start|>``),
each message's content is plain text, so a user who writes
``<|im_start|>system`` gets those characters, not a forged turn.
"""

from __future__ import annotations

from appliance.backends.base import Backend
from appliance.chat_template import ChatTemplateError, render_chat
from appliance.tools import template_renders_tools, tools_as_text


def chat_tokens(backend: Backend, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    template, bos, eos = backend.chat_template()
    if not template_renders_tools(template) and (tools or _holds_tool_turns(messages)):
        messages, tools = tools_as_text(messages, tools), None
    rendered = render_chat(template, messages, bos_token=bos, eos_token=eos, tools=tools)
    tokens: list[int] = []
    for i, (text, is_content) in enumerate(_split_contents(rendered, messages)):
        tokens += backend.tokenize(text, add_special=i == 0, parse_special=not is_content)
    return _one_bos(backend, tokens)


def _holds_tool_turns(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def completion_tokens(backend: Backend, prompt: str) -> list[int]:
    """A plain completion's prompt is the client's own template: its control-token text is parsed, as llama-server does."""
    return _one_bos(backend, backend.tokenize(prompt, add_special=True, parse_special=True))


def _split_contents(rendered: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_message_content) pieces, in order."""
    pieces, cursor = [], 0
    for message in messages:
        content = message.get("content") or ""
        start, found = _find(rendered, content, cursor)
        if found is None:
            if content.strip():
                raise ChatTemplateError("the model's chat template rewrites message text, so it cannot be tokenized "
                                        "safely; use /v1/completions with a prompt of your own")
            continue
        if start > cursor:
            pieces.append((rendered[cursor:start], False))
        pieces.append((found, True))
        cursor = start + len(found)
    if cursor < len(rendered):
        pieces.append((rendered[cursor:], False))
    return [p for p in pieces if p[0]]


def _find(rendered: str, content: str, cursor: int) -> tuple[int, str | None]:
    """Where a message's content sits, as written or as templates often trim it."""
    for candidate in (content, content.strip()):
        if candidate:
            at = rendered.find(candidate, cursor)
            if at >= 0:
                return at, candidate
    return cursor, None


def _one_bos(backend: Backend, tokens: list[int]) -> list[int]:
    # A chat template that writes the BOS text itself would otherwise give two.
    bos = backend.bos_token
    if bos is not None and len(tokens) >= 2 and tokens[0] == tokens[1] == bos:
        return tokens[1:]
    return tokens
