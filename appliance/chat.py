"""``appliance chat``: a streaming terminal chat with the model in a runner process of its own (no server needed)."""

from __future__ import annotations

import json
import time

import click

from appliance.api.generation import Cancellation, Generation, GenerationFailed
from appliance.backends.base import SamplingParams
from appliance.config import Settings
from appliance.db import Database
from appliance.errors import APIError
from appliance.runner.supervisor import ModelRunner
from appliance.scheduler import Admission
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
    log_id = db.start_request(endpoint="cli:chat", client="terminal", model=runner.name, stream=1,
                              prompt=json.dumps(messages, ensure_ascii=False))
    interrupted = []
    cancel = Cancellation(client_gone=lambda: bool(interrupted), shutting_down=lambda: False)
    generation = Generation(runner, db, admission, log_id, time.perf_counter(), cancel, client="terminal", priority=None)
    try:
        generation.start(messages, None, params)
    except APIError as exc:
        db.finish_request(log_id, status=exc.status, error=exc.message)
        click.echo(f"Error: {exc.message}", err=True)
        return None
    try:
        for output in generation.outputs():
            click.echo(output.text, nl=False)
        generation.finish(200)
    except KeyboardInterrupt:
        interrupted.append(True)
        generation.finish(499, "interrupted")
        click.echo(" [interrupted]", err=True)
    except GenerationFailed as exc:
        generation.finish(exc.status, exc.message)
        click.echo(f"\nError: {exc.message}", err=True)
    click.echo()
    return generation.response_text
