"""Tool calling in one place: how tools reach the prompt, what a call looks like in the output, how it is parsed.

A call is written as Hermes, Qwen 2.5 and Qwen 3 write it, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

A model whose chat template renders tools itself (it reads ``tools``) gets them that way. Any other model, such as
SmolLM2, gets ``DEFAULT_PROMPT`` as the start of its system message, its earlier calls written back as blocks and
tool results as user turns wrapped in ``<tool_response>``. When a call is required or named, decoding is
constrained to such blocks, with the arguments following the tool's JSON schema (``call_grammar``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)

DEFAULT_PROMPT = """You can call tools. To call one, answer with nothing but this, once per call:
<tool_call>
{{"name": "<the tool's name>", "arguments": {{<its arguments as JSON>}}}}
</tool_call>
A tool's result comes back to you inside <tool_response></tool_response>. The tools, as JSON schemas:
{tools}"""

# No free whitespace inside a constrained call (as for response_format, see appliance.grammar.JSON_OPTIONS).
_JSON_STYLE = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_json(self, call_id: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# -- the prompt ------------------------------------------------------------------------------------------------
def template_renders_tools(template: str) -> bool:
    return "tools" in template


def tools_as_text(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows nothing of tools: the tool list in the system message, calls as
    blocks in assistant turns, results as user turns."""
    out = []
    for message in messages:
        if message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"})
        elif message.get("tool_calls"):
            blocks = [block(call["function"]["name"], call["function"]["arguments"]) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [message.get("content"), *blocks]))})
        else:
            out.append({"role": message["role"], "content": message.get("content") or ""})
    if tools:
        listed = DEFAULT_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{listed}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": listed})
    return out


def block(name: str, arguments) -> str:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


# -- constrained calls -----------------------------------------------------------------------------------------
def call_grammar(tools: list[dict], only: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance's) of one call block, or of several with ``parallel``: a call of ``only``, or of
    any of the tools."""
    chosen = [t for t in tools if only is None or t["function"]["name"] == only]
    schemas = [_call_schema(t["function"]) for t in chosen]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    repeat = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{repeat}\n"
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(body | _JSON_STYLE)}\n")


def _call_schema(function: dict) -> dict:
    return {"type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


# -- the output ------------------------------------------------------------------------------------------------
def parse_call(text: str, names: set[str]) -> ToolCall | None:
    """The call one block holds, or None if it holds no call of a known tool."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))


def split_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """A whole answer as (its text outside the call blocks, its calls); a block holding no known call stays text."""
    calls, kept, cursor = [], [], 0
    for match in _BLOCK.finditer(text):
        call = parse_call(match.group(1), names)
        if call is None:
            continue
        kept.append(text[cursor:match.start()])
        calls.append(call)
        cursor = match.end()
    kept.append(text[cursor:])
    return "".join(kept).strip() if calls else text, calls


class CallStream:
    """Streamed text in, content and whole calls out: text that may be the start of a call block is held back until
    it is known. ``push`` and ``end`` give (content, calls)."""

    def __init__(self, names: set[str]):
        self.names, self._held, self._in_call = names, "", False

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._held.find(CLOSE)
                if end < 0:
                    break
                inner, self._held, self._in_call = self._held[:end], self._held[end + len(CLOSE):], False
                call = parse_call(inner.strip(), self.names)
                if call:
                    calls.append(call)
                else:
                    content.append(OPEN + inner + CLOSE)
                continue
            start = self._held.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._held, OPEN)
                content.append(self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                break
            content.append(self._held[:start])
            self._held, self._in_call = self._held[start + len(OPEN):], True
        return "".join(content), calls

    def end(self) -> tuple[str, list[ToolCall]]:
        """What is still held when the answer ends: an unclosed block is a call if it parses, else text."""
        held, in_call, self._held = self._held, self._in_call, ""
        if in_call:
            call = parse_call(held.strip(), self.names)
            return ("", [call]) if call else (OPEN + held, [])
        return held, []


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that is a start of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
