"""Render a model's own Jinja chat template, the way transformers does.

Both backends take the template from the model files (GGUF metadata or
``tokenizer_config.json``). A template that fails is an error, never a
silent fallback to another prompt format.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. roles out of order)."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    # tojson stays Jinja's own, unlike transformers': it writes < and > as \u003c and \u003e, so nothing a
    # template writes as JSON (tool definitions, a call's arguments) can spell a control token.
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    try:
        return _compile(template).render(
            messages=messages,
            tools=tools,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except ChatTemplateError:
        raise
    except Exception as exc:  # a TemplateError, or a TypeError in one (e.g. `tools|length` with no tools)
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
