"""``appliance chat``: a streaming terminal chat with the model in a runner process of its own (no server needed)."""

from __future__ import annotations

import json

import click

from appliance.admission import Admission
from appliance.backends.base import SamplingParams
from appliance.config import Settings
from appliance.db import Database
from appliance.errors import APIError
from appliance.generation import Generation
from appliance.request import Cancellation, LoggedRequest
from appliance.runner.supervisor import ModelRunner
from models import find_model


def run_chat(settings: Settings, system: str | None, temperature: float, max_tokens: int) -> None:
    runner = ModelRunner(find_model(settings.model, home=settings.home), threads=settings.threads,
                         context_length=settings.context_length, parallel=1, provider=settings.provider)
    db = Database.from_settings(settings, service=False)  # a running service's open rows are its own
    admission = Admission(slots=1, queue_size=1)
    click.echo(f"Loading {runner.name}...", err=True)
    runner.ensure_loaded()
    click.echo("Type 'exit' or press Ctrl-D to leave.", err=True)
    messages = [{"role": "system", "content": system}] if system else []
    try:
        while True:
            try:
                line = click.prompt(click.style(">", bold=True), prompt_suffix=" ")
            except (EOFError, click.Abort):
                break
            if line.strip() in ("exit", "quit"):
                break
            messages.append({"role": "user", "content": line})
            reply = _turn(runner, db, admission, messages, SamplingParams(max_tokens=max_tokens, temperature=temperature))
            if reply is not None:
                messages.append({"role": "assistant", "content": reply})
            else:
                messages.pop()
    finally:
        runner.unload()
        db.close()
    click.echo("", err=True)


def _turn(runner: ModelRunner, db: Database, admission: Admission, messages: list[dict],
          params: SamplingParams) -> str | None:
    interrupted = []  # Ctrl-C is how this client leaves: it interrupts the wait or the tokens at once
    cancel = Cancellation(client_gone=lambda: bool(interrupted), shutting_down=lambda: False, left="interrupted")
    logged = LoggedRequest(db, endpoint="cli:chat", client="terminal", cancel=cancel, model=runner.name, stream=1,
                           prompt=json.dumps(messages, ensure_ascii=False))
    try:
        generation = Generation(runner, admission, logged.started, cancel, client="terminal", priority=None)
        generation.start(messages, None, params)
        logged.generation = generation
        for output in generation.outputs():
            click.echo(output.text, nl=False)
    except KeyboardInterrupt:
        interrupted.append(True)
        logged.fail(APIError("interrupted", code="cancelled", status=499))
        click.echo(" [interrupted]", err=True)
    except APIError as exc:  # refused before it started, or failed on the way
        logged.fail(exc)
        mid_answer = logged.generation is not None
        click.echo(("\n" if mid_answer else "") + f"Error: {exc.message}", err=True)
    finally:
        logged.finish()
    if logged.generation is None:
        return None
    click.echo()
    return logged.generation.response_text
