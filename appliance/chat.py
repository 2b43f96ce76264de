"""``appliance chat``: a streaming terminal chat with the model running in this process."""

from __future__ import annotations

import json
import time

import click

from appliance.api.generation import Cancellation, GenerationResult, logged_generation
from appliance.backends import SamplingParams
from appliance.chat_template import ChatTemplateError
from appliance.config import Settings
from appliance.db import Database
from appliance.runner import ModelRunner
from models import find_model


def run_chat(settings: Settings, system: str | None, temperature: float, max_tokens: int) -> None:
    runner = ModelRunner(
        find_model(settings.model, home=settings.home), threads=settings.threads, context_length=settings.context_length,
        provider=settings.provider,
    )
    db = Database(settings.db_path, store_text=settings.log_text)
    click.echo(f"Loading {runner.name}...", err=True)
    runner.ensure_loaded()
    click.echo("Type 'exit' or press Ctrl-D to leave.", err=True)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = click.prompt(click.style(">", bold=True), prompt_suffix=" ")
        except (EOFError, click.Abort):
            break
        if line.strip() in ("exit", "quit"):
            break
        messages.append({"role": "user", "content": line})
        reply = _turn(runner, db, messages, temperature, max_tokens)
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        else:
            messages.pop()
    click.echo("", err=True)


def _turn(runner: ModelRunner, db: Database, messages: list[dict], temperature: float, max_tokens: int) -> str | None:
    started = time.perf_counter()
    log_id = db.start_request(endpoint="cli:chat", client="terminal", model=runner.name, stream=1,
                              prompt=json.dumps(messages, ensure_ascii=False))
    with runner.session() as backend:
        try:
            prompt = backend.tokenize(backend.render_chat(messages))
        except ChatTemplateError as exc:
            db.finish_request(log_id, status=400, error=str(exc))
            click.echo(f"Error: {exc}", err=True)
            return None
        room = backend.context_length - len(prompt)
    if room < 1:
        db.finish_request(log_id, status=400, error="context full", prompt_tokens=len(prompt))
        click.echo("Error: the conversation no longer fits the context; start a new chat.", err=True)
        return None
    params = SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature)
    result = GenerationResult()
    cancel = Cancellation(client_gone=lambda: False, shutting_down=lambda: False)
    try:
        for chunk in logged_generation(runner, db, log_id, started, prompt, params, cancel, result):
            click.echo(chunk.text, nl=False)
    except KeyboardInterrupt:
        click.echo(" [interrupted]", err=True)
    click.echo()
    return result.text
