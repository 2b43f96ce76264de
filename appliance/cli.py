"""The ``appliance`` command: serve, chat, models, logs, status, keys."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from appliance.config import ConfigError, Settings, load_settings
from models import ModelNotFound
from models.manifest import ManifestError
from models.registry import RegistryError
from models.transfer import TransferError

def _settings(ctx: click.Context, **flags) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"), overrides=flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


PLUGIN_GROUP = "appliance.commands"  # entry points: the model pipeline's commands (distill, export) come this way


class _Group(click.Group):
    """The catalog's own errors (unknown model, broken registry or package) end as one-line messages.

    Commands of installed plugins (entry points in PLUGIN_GROUP) are listed by name and imported only
    when run, so the service never imports the pipeline and ``appliance --help`` stays quick.
    """

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_plugins()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in _plugins():
            command = _plugins()[name].load()
        return command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ModelNotFound, ManifestError, RegistryError, TransferError) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(
    cls=_Group,
    epilog="Settings come from defaults < $APPLIANCE_HOME/config.toml < APPLIANCE_<NAME> environment "
    "variables < flags.\n\nExample:\n\n  appliance serve --port 8080\n\n  curl http://127.0.0.1:8080/v1/models"
)
@click.version_option(package_name="edge-appliance")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file (default: $APPLIANCE_HOME/config.toml)")
@click.pass_context
def cli(ctx, config):
    """An offline inference appliance: local language models behind an OpenAI-compatible API.

    Nothing here reaches the network: models come from local files or from
    installed packages that ship their weights.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@cli.command()
@click.option("--host", help="address to listen on [default: 127.0.0.1; 0.0.0.0 exposes it to the network]")
@click.option("--port", type=int, help="TCP port [default: 8080]")
@click.option("-m", "--model", help="catalog name or .gguf path [default: smollm2-135m-instruct]")
@click.option("-t", "--threads", type=int, help="CPU threads for inference [default: physical cores]")
@click.option("--context-length", type=int, help="context window of each slot in tokens [default: 4096]")
@click.option("-p", "--parallel", type=int, help="slots: requests generated together in one batch [default: 4]")
@click.option("--home", type=click.Path(file_okay=False), help="data folder [default: ~/.appliance]")
@click.pass_context
def serve(ctx, host, port, model, threads, context_length, parallel, home):
    """Serve a model over the OpenAI-compatible REST API.

    \b
    Endpoints:
      POST /v1/chat/completions   chat, streaming with "stream": true
      POST /v1/completions        plain text completion
      GET  /v1/models             the served model
      GET  /healthz, /readyz      process up / model loaded

    \b
    Example:
      appliance serve --port 8080 --threads 4
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'

    Beyond loopback (--host 0.0.0.0) API keys are required: create an admin key first
    with 'appliance keys create --role admin'. With the settings tls_cert and tls_key it
    serves HTTPS ('appliance tls self-signed' makes a certificate).
    """
    from appliance.app import create_app
    from appliance.power import limit_malloc_arenas
    from appliance.server import serve as run_server

    limit_malloc_arenas()
    settings = _settings(ctx, host=host, port=port, model=model, threads=threads, context_length=context_length,
                         parallel=parallel, home=home)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from appliance.auth import AuthSetupError
    from appliance.certificates import TLSSetupError, server_context

    try:
        tls_context = server_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
        app = create_app(settings)
    except (AuthSetupError, TLSSetupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"appliance: logging requests to {settings.db_path}", err=True)
    run_server(app, tls_context, on_ready=lambda m: click.echo(m, err=True))


@cli.command()
@click.option("-m", "--model", help="catalog name or .gguf path [default: the configured model]")
@click.option("-s", "--system", help="system prompt")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("-t", "--threads", type=int, help="CPU threads for inference")
@click.pass_context
def chat(ctx, model, system, temperature, max_tokens, threads):
    """Chat with a model in the terminal; answers stream as they are generated.

    The model runs in this process (no server needed) and every turn is
    logged like an API request. Type 'exit' or press Ctrl-D to leave.
    """
    from appliance.chat import run_chat

    settings = _settings(ctx, model=model, threads=threads)
    run_chat(settings, system=system, temperature=temperature, max_tokens=max_tokens)


_home_option = click.option("--home", type=click.Path(file_okay=False), help="data folder [default: ~/.appliance]")


def _home(ctx: click.Context, home: str | None) -> Path:
    """The data folder from the one config (flag < env < default), where models.json lives."""
    return _settings(ctx, home=home).home


@cli.group(invoke_without_command=True)
@click.pass_context
def models(ctx):
    """List the models this box knows (``appliance models verify`` checks their files)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_home_option
@click.pass_context
def models_list(ctx, as_json, home):
    """List known models, where their files are and whether they are installed."""
    from models import list_models

    entries = list_models(home=_home(ctx, home))
    if as_json:
        click.echo(json.dumps([_entry_json(e) for e in entries], indent=2))
        return
    for e in entries:
        where = str(e.path) if e.available else f"not installed ({e.source})"
        click.echo(f"{e.name:<24} {e.format:<5} {e.description}\n{'':<24} {where}")


@models.command("verify")
@_home_option
@click.pass_context
def models_verify(ctx, home):
    """Recompute the sha256 of every installed model file; exit 1 on any mismatch."""
    from models import list_models, verify_model

    failed = False
    for e in list_models(home=_home(ctx, home)):
        ok, detail = verify_model(e)
        failed |= not ok and e.available
        click.echo(f"{'OK  ' if ok else 'FAIL'} {e.name:<24} {detail}")
    sys.exit(1 if failed else 0)


@models.command("add")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", help="model id of a builder folder without a manifest [default: the folder's name]")
@_home_option
@click.pass_context
def models_add(ctx, path, name, home):
    """Register a model package folder (with manifest.json) after checking every file's sha256.

    A folder written by onnxruntime-genai's model builder (genai_config.json, model.onnx) gets its
    manifest.json written first, once the ONNX backend's checks pass. The list of packages lives in
    models.json in the data folder (--home, else $APPLIANCE_HOME, else ~/.appliance); the files stay
    where they are.

    \b
    Example:
      appliance export ./student --target arm --out ./packages
      appliance models add ./packages/student-arm-gguf
      appliance models add ./qwen2.5-0.5b-int4-cpu --name qwen2.5-0.5b
    """
    from models.registry import add_package

    manifest = add_package(path, home=_home(ctx, home), name=name)
    click.echo(f"added {manifest.name} ({manifest.format} {manifest.quantization}, target {manifest.target}): "
               f"serve it with appliance serve --model {manifest.name}")


@models.command("remove")
@click.argument("name_or_path")
@_home_option
@click.pass_context
def models_remove(ctx, name_or_path, home):
    """Forget a package added with ``models add``, by name or folder; its files are left on disk.

    \b
    Example:
      appliance models remove student-arm-gguf
    """
    from models.registry import remove_package

    folder = remove_package(name_or_path, home=_home(ctx, home))
    click.echo(f"removed {folder} from the registry (its files are still there)")


@models.command("export")
@click.argument("name_or_path")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="the tar file to write")
@click.option("--sign", "private_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM) to sign the checksums with, the install bundle's kind")
@_home_option
@click.pass_context
def models_export(ctx, name_or_path, out, private_key, home):
    """Write a model package to one tar file, with its manifest and checksums, for another box.

    \b
    Example:
      appliance models export student-arm-gguf --out student.tar --sign signing.pem
      # on the other box:
      appliance models import student.tar --public-key signing.pub
    """
    from models import find_model
    from models.transfer import export_package

    entry = find_model(name_or_path, home=_home(ctx, home))
    if entry.package is None:
        raise click.ClickException(f"{entry.name} is not a model package (a folder with manifest.json): only packages "
                                   "can be exported; 'appliance bundle' carries the bundled model")
    manifest = export_package(entry.package, out, private_key)
    signed = f", signed with {private_key}" if private_key else ", unsigned"
    click.echo(f"exported {manifest.name} to {out} ({out.stat().st_size / 2**20:.1f} MiB{signed})")


@models.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM): the export must be signed with its private key")
@_home_option
@click.pass_context
def models_import(ctx, archive, public_key, home):
    """Check an exported package (links, paths, checksums, signature, manifest) and register it.

    It is unpacked under the data folder's models/ folder; nothing is left there when a check fails.

    \b
    Example:
      appliance models import student.tar --public-key signing.pub
    """
    from models.transfer import import_and_register

    manifest, folder = import_and_register(archive, _home(ctx, home), public_key)
    checked = "signature and checksums checked" if public_key else "checksums checked, no signature asked for"
    click.echo(f"imported {manifest.name} into {folder} ({checked}): serve it with appliance serve --model "
               f"{manifest.name}, or ask for it by name")


_url_option = click.option("--url", help="service address [default: http://<host>:<port> from the settings]")


@models.command("load")
@click.argument("name")
@_url_option
@click.pass_context
def models_load(ctx, name, url):
    """Load a model in the running service now, so its first request has no load delay.

    The service makes room as for a request: past max_loaded or max_model_memory_mb it
    first unloads the least recently used idle model. Where keys are on, set
    APPLIANCE_API_KEY to an admin key.

    \b
    Example:
      appliance models load smollm2
    """
    info = _call_service(ctx, url, f"/api/models/{name}/load", {})
    click.echo(f"{info['id']} loaded in {info.get('load_seconds', '-')} s (runner pid {info['runner_pid']}, "
               f"about {info['estimated_memory_mib']} MiB)")


@models.command("unload")
@click.argument("name")
@click.option("--force", is_flag=True, help="unload even while requests use it (they fail with 503)")
@_url_option
@click.pass_context
def models_unload(ctx, name, force, url):
    """Unload a model from the running service; its memory goes back to the system.

    Refused while requests use the model, unless --force. The next request for it loads it
    again. Where keys are on, set APPLIANCE_API_KEY to an admin key.

    \b
    Example:
      appliance models unload smollm2
    """
    info = _call_service(ctx, url, f"/api/models/{name}/unload" + ("?force=true" if force else ""), {})
    click.echo(f"{info['id']} unloaded")


@models.command("swap")
@click.argument("name")
@click.argument("package")
@_url_option
@click.pass_context
def models_swap(ctx, name, package, url):
    """Point NAME (a model's name or alias) at PACKAGE without a restart.

    The new model loads beside the old one and must pass a warm-up probe (swap_probe_tokens
    tokens from each fixed prompt, within swap_probe_timeout); then NAME moves to it at once,
    running requests finish on the old model, and the old one is unloaded. A failed probe
    leaves the old model serving. Where keys are on, set APPLIANCE_API_KEY to an admin key.

    \b
    Example:
      appliance models add ./packages/student-v2-gguf
      appliance models swap smollm2 student-v2
    """
    info = _call_service(ctx, url, f"/api/models/{name}/swap", {"package": package})
    click.echo(f"{name} now serves {info['id']} (runner pid {info['runner_pid']})")


def _entry_json(e) -> dict:
    return {"name": e.name, "format": e.format, "path": str(e.path) if e.path else None, "sha256": e.sha256,
            "available": e.available, "source": e.source, "aliases": list(e.aliases), "kind": e.kind}


@cli.group(invoke_without_command=True)
@click.option("-n", "--count", type=int, default=20, show_default=True, help="how many recent requests")
@click.option("--json", "as_json", is_flag=True, help="full rows as JSON")
@_home_option
@click.pass_context
def logs(ctx, count, as_json, home):
    """Show recent requests from the SQLite log ($APPLIANCE_HOME/logs.db).

    \b
    Example:
      appliance logs -n 50
      appliance logs verify     # check the audit chain: edited or deleted rows
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = _read_log(_settings(ctx, home=home)).recent_requests(count)
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    click.echo(f"{'id':>5} {'started':<23} {'endpoint':<22} {'status':>6} {'in':>5} {'out':>5} {'ttft ms':>8} {'tok/s':>7}  error")
    for r in reversed(rows):
        click.echo(
            f"{r['id']:>5} {r['started'][:23]:<23} {r['endpoint']:<22} {_fmt(r['status']):>6} "
            f"{_fmt(r['prompt_tokens']):>5} {_fmt(r['completion_tokens']):>5} {_fmt(r['ttft_ms'], 1):>8} "
            f"{_fmt(r['tokens_per_s'], 1):>7}  {r['error'] or ''}"
        )


@logs.command("verify")
@click.option("--public-key", help="hex Ed25519 key the checkpoints must be signed with "
              "[default: audit-key.pub in the data folder]; a copy kept off the box pins it")
@click.option("--json", "as_json", is_flag=True, help="the result as JSON")
@_home_option
@click.pass_context
def logs_verify(ctx, public_key, as_json, home):
    """Check the log's hash chain and signed checkpoints; exit 1 when a row was edited or deleted.

    Every finished row carries a digest over itself and the row before; the service signs the
    chain's head into audit-head.json after every row, and as a checkpoint every
    audit_checkpoint_rows rows, at shutdown and before pruning. An UPDATE, INSERT or DELETE made
    behind the service's back is reported with the row's id and place (seq), rows cut from the
    end included.

    \b
    Example:
      appliance logs verify
      appliance logs verify --public-key "$(cat /media/usb/audit-key.pub)"
    """
    from appliance.audit.keys import trusted_public_key
    from appliance.audit.verify import verify_log

    settings = _settings(ctx, home=home)
    result = verify_log(_read_log(settings), public_key or trusted_public_key(settings.home),
                        checkpoint_rows=settings.audit_checkpoint_rows)
    if as_json:
        click.echo(json.dumps({"ok": result.ok, "rows": result.rows, "first_seq": result.first_seq,
                               "last_seq": result.last_seq, "signed_through": result.signed_through,
                               "open_rows": result.open_rows, "problems": result.problems}, indent=2))
    else:
        for problem in result.problems:
            click.echo(f"FAIL {problem}")
        span = f"seq {result.first_seq} to {result.last_seq}" if result.rows else "no rows yet"
        click.echo(f"{'OK  ' if result.ok else 'FAIL'} {result.rows} chained row(s) ({span}), signed through seq "
                   f"{result.signed_through or 0}; {result.unsigned_tail} not yet signed, {result.open_rows} still open")
    sys.exit(0 if result.ok else 1)


@logs.command("export")
@click.option("--since", help="rows started at or after this ISO 8601 time (UTC unless it names a zone)")
@click.option("--until", help="rows started before this time")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--model", help="only this model's rows")
@click.option("--status", help="an HTTP status, or ok, error, cancelled, open")
@click.option("--key-id", help="only rows of this API key id")
@click.option("--priority", help="only rows of requests that ran in this priority class")
@click.option("--endpoint", help="only this endpoint, e.g. /v1/chat/completions")
@click.option("-q", "--search", help="text in the prompt, response or error")
@click.option("--text/--no-text", default=False, show_default=True, help="include prompts and responses")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="file to write [default: stdout]")
@_home_option
@click.pass_context
def logs_export(ctx, since, until, fmt, model, status, key_id, priority, endpoint, search, text, out, home):
    """Write the log's rows, newest first, as JSON Lines (for a SIEM or ELK) or CSV.

    The same filters as the web UI's Logs page and GET /api/logs/export.

    \b
    Example:
      appliance logs export --since 2026-12-01 --format jsonl --out requests.jsonl
      appliance logs export --status error --format csv
    """
    from appliance import log_export
    from appliance.errors import APIError

    try:
        filters = log_export.parse_filters({"since": since, "until": until, "model": model, "status": status,
                                            "key_id": key_id, "priority": priority, "endpoint": endpoint,
                                            "q": search})
    except APIError as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{exc.param}") from None
    db = _read_log(_settings(ctx, home=home))
    chunks = log_export.export(db.iter_requests(*log_export.where_clause(filters)), fmt, text)
    stream = open(out, "w", encoding="utf-8", newline="") if out else sys.stdout
    try:
        for chunk in chunks:
            stream.write(chunk)
    finally:
        if out:
            stream.close()


def _read_log(settings: Settings):
    from appliance.db import Database

    if not settings.db_path.exists():
        raise click.ClickException(f"no log yet at {settings.db_path}: start the service with 'appliance serve'")
    return Database(settings.db_path, readonly=True)


@cli.command()
@_url_option
@click.option("--power", "power_state", type=click.Choice(["active", "idle", "deep_idle"]), help="force this power state first")
@click.option("--json", "as_json", is_flag=True, help="the raw /api/status answer")
@click.pass_context
def status(ctx, url, power_state, as_json):
    """Show the running service's power state, models and system figures.

    \b
    Example:
      appliance status
      appliance status --power deep_idle    # unload the model now
    """
    if power_state:
        _call_service(ctx, url, "/api/power", {"state": power_state})
    info = _call_service(ctx, url, "/api/status")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    system = info["system"]
    wake = f"{info['last_wake_ms']} ms" if info["last_wake_ms"] is not None else "-"
    click.echo(f"state      {info['state']} for {info['seconds_in_state']} s (next: {info['next_state'] or '-'} "
               f"in {info['seconds_to_next_state'] if info['seconds_to_next_state'] is not None else '-'} s)")
    click.echo(f"model      {info['model']['id']} ({'loaded' if info['model']['loaded'] else 'unloaded'}, "
               f"loaded {info['model']['load_count']}x), last wake {wake}")
    pool = info["models"]
    click.echo(f"models     {', '.join(pool['loaded']) or 'none'} loaded, about {pool['estimated_memory_mib']} MiB "
               f"of max_model_memory_mb {pool['max_model_memory_mb']} (max_loaded {pool['max_loaded']})")
    click.echo(f"process    RSS {system['rss'] / 2**20:.0f} MiB, CPU {system['cpu_percent']:.1f}%, "
               f"{info['requests_in_flight']} request(s) in flight")
    click.echo(f"box        {system['available_memory'] / 2**20:.0f} MiB available of {system['total_memory'] / 2**20:.0f}, "
               f"CPU {system['system_cpu_percent']:.1f}%, power profile {info['profile']}{' (dry run)' if info['dry_run'] else ''}")


def _call_service(ctx: click.Context, url: str | None, path: str, body: dict | None = None) -> dict:
    """GET path (POST body, when given) on the running service, with $APPLIANCE_API_KEY; its JSON answer."""
    import ssl
    import urllib.error
    import urllib.request

    settings = _settings(ctx)
    scheme = "https" if settings.tls_cert else "http"
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # a wildcard listens on loopback too
    base = url or f"{scheme}://{host}:{settings.port}"
    key = os.environ.get("APPLIANCE_API_KEY")  # an admin key, where the service requires keys
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    tls = None
    if settings.tls_cert:  # the system's CAs, and the box's own certificate (it may be self-signed)
        tls = ssl.create_default_context()
        tls.load_verify_locations(cafile=settings.tls_cert)
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        # A load or a swap may take minutes on a small box; a look at the status never does.
        answer = urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers),
                                        timeout=10 if data is None else 600, context=tls).read()
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{base} answered {exc.code}: {_error_message(exc)}") from None
    except urllib.error.URLError as exc:
        raise click.ClickException(f"no service answers at {base} ({exc.reason}): start it with 'appliance serve'") from None
    return json.loads(answer)


def _error_message(exc) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)


# -- API keys -------------------------------------------------------------------------------------
@cli.group()
def keys():
    """API keys: who may call the box, with which role.

    \b
    Roles:
      user      /v1/* (chat, completions, models)
      admin     /v1/* and the admin API (/api/status, /api/power, /api/logs)
      auditor   only reads the log (/api/logs) and the metrics
      metrics   only reads the metrics (/metrics): a scrape token for Prometheus

    Keys are required when the service listens beyond loopback, and on loopback once any key
    exists (setting auth: auto, required or off). Clients send 'Authorization: Bearer <key>'.
    """


@contextmanager
def _keys_db(ctx: click.Context, home: str | None):
    from appliance.db import Database

    # service=False: the service may be running; its open request rows are its own.
    db = Database(_settings(ctx, home=home).db_path, service=False)
    try:
        yield db
    finally:
        db.close()


@keys.command("create")
@click.option("--role", type=click.Choice(["user", "admin", "auditor", "metrics"]), required=True)
@click.option("--name", help="who or what the key is for")
@click.option("--expires", help="last valid date (2027-01-31) or ISO date-time, UTC unless it says otherwise")
@click.option("--priority", help="priority class of the key's requests (a request may ask for a lower one only)")
@click.option("--rpm", type=click.IntRange(min=0), help="requests per minute for this key [default: rate_limit_rpm]")
@click.option("--tpm", type=click.IntRange(min=0), help="generated tokens per minute for this key "
              "[default: rate_limit_tpm]; 0: no limit")
@_home_option
@click.pass_context
def keys_create(ctx, role, name, expires, priority, rpm, tpm, home):
    """Create a key and print it: it is shown this once, only its salted hash is kept.

    \b
    Example:
      appliance keys create --role admin --name ops
      appliance keys create --role user --name kiosk --expires 2027-06-30 --priority interactive
      appliance keys create --role user --name batch-job --priority batch --rpm 10 --tpm 20000
      appliance keys create --role metrics --name prometheus     # a scrape token for /metrics
    """
    from appliance.auth import hash_secret, new_key, parse_expiry

    settings = _settings(ctx, home=home)
    classes = [c["name"] for c in settings.priority_classes]
    if priority is not None and priority not in classes:
        raise click.BadParameter(f"unknown priority class {priority!r}: use one of {', '.join(classes)}",
                                 param_hint="--priority")
    try:
        expiry = parse_expiry(expires) if expires else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from None
    key_id, key = new_key()
    with _keys_db(ctx, home) as db:
        fields = dict(name=name, role=role, priority=priority, expires=expiry, rpm=rpm, tpm=tpm)
        db.add_api_key(id=key_id, **fields, **hash_secret(key))
        db.record_action("cli:keys create", _operator(), key_id, json.dumps(fields))
    click.echo(key)
    click.echo(f"key {key_id} ({role}) created; it is shown only now: keep it, send it as "
               "'Authorization: Bearer <key>'", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_home_option
@click.pass_context
def keys_list(ctx, as_json, home):
    """List keys (ids, roles, state; never the keys themselves)."""
    from appliance.auth import key_state

    with _keys_db(ctx, home) as db:
        rows = [row | {"state": key_state(row)} for row in db.api_keys()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'id':<14} {'role':<8} {'state':<8} {'priority':<12} {'rpm/tpm':<14} {'expires':<26} name")
    for r in rows:
        limits = f"{_fmt(r['rpm'])}/{_fmt(r['tpm'])}"
        click.echo(f"{r['id']:<14} {r['role']:<8} {r['state']:<8} {r['priority'] or '-':<12} {limits:<14} "
                   f"{r['expires'] or 'never':<26} {r['name'] or ''}")


@keys.command("revoke")
@click.argument("key_id")
@_home_option
@click.pass_context
def keys_revoke(ctx, key_id, home):
    """Revoke a key by its id (from 'keys list'); a running service refuses it from its next request."""
    with _keys_db(ctx, home) as db:
        key_id = key_id.removeprefix("sk-").split("-")[0]
        revoked = db.revoke_api_key(key_id)
        if revoked:
            db.record_action("cli:keys revoke", _operator(), key_id, "{}")
    if not revoked:
        raise click.ClickException(f"no active key {key_id!r}: 'appliance keys list' shows the keys")
    click.echo(f"key {key_id} revoked")


# -- HTTPS ----------------------------------------------------------------------------------------
@cli.group()
def tls():
    """HTTPS: a certificate and key for the service.

    The settings tls_cert and tls_key (a PEM certificate and its key) turn HTTPS on. Sites without a PKI make a self-signed certificate here, and each client pins it: it trusts
    that one certificate, copied to it, instead of a certificate authority.

    \b
    Example:
      appliance tls self-signed --host box.lan --host 192.168.1.20
    """


@tls.command("self-signed")
@click.option("--host", "hosts", multiple=True, help="a name or IP address clients reach the box by; repeat it for "
              "each [default: this machine's hostname]; localhost and 127.0.0.1 are always added")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="folder for cert.pem and key.pem [default: $APPLIANCE_HOME/tls]")
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True,
              help="days the certificate is valid (825 is the most Apple's clients accept)")
@click.option("--force", is_flag=True, help="replace the certificate and key that are there")
@click.pass_context
def tls_self_signed(ctx, hosts, out, days, force):
    """Make a private key and a self-signed certificate.

    The key is EC P-256, readable by its owner only. A client checks that the name in its URL is one of the certificate's, so give every name and
    address clients use. The command prints the config lines that turn HTTPS on, and how clients
    pin the certificate. Copy cert.pem to the clients; the key never leaves the box.

    \b
    Example:
      appliance tls self-signed --host box.lan --host 192.168.1.20
      appliance serve --host 0.0.0.0     # after adding the printed lines to config.toml
      curl --cacert ~/.appliance/tls/cert.pem https://box.lan:8080/v1/models
    """
    from appliance.config import default_home
    from appliance.certificates import write_self_signed

    try:
        cert, key, fingerprint = write_self_signed(out or default_home() / "tls", list(hosts), days=days, force=force)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc.filename} is there already: --force replaces it (and clients that "
                                   "pinned the old certificate must then pin the new one)") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--host") from None
    config = ctx.obj.get("config") or os.environ.get("APPLIANCE_CONFIG") or default_home() / "config.toml"
    click.echo(_pinning_help(cert, key, fingerprint, hosts[0] if hosts else "127.0.0.1", config))


def _pinning_help(cert: Path, key: Path, fingerprint: str, host: str, config) -> str:
    url = f"https://{host}:8080"
    # JSON strings are TOML strings too: quotes and backslashes in a path come out right.
    return f"""wrote {cert} (the certificate) and {key} (its key, readable by you only)
sha256 fingerprint {fingerprint}

Turn HTTPS on: add these lines to {config}, then restart 'appliance serve':
  tls_cert = {json.dumps(str(cert))}
  tls_key = {json.dumps(str(key))}

Clients pin the certificate (copy cert.pem to them, compare the fingerprint; never copy the key):
  curl --cacert cert.pem {url}/v1/models
  openai.OpenAI(base_url="{url}/v1", api_key=...,
                http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile="cert.pem")))
  SSL_CERT_FILE=cert.pem   for Python's ssl defaults and httpx (the openai client); it then trusts only this certificate"""


def _operator() -> str:
    """Who ran a command that changes the box, for its log row."""
    import getpass

    try:
        return f"{getpass.getuser()} (terminal)"
    except (KeyError, OSError):  # a uid with no name, as in some containers
        return f"uid {os.getuid()} (terminal)"


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if digits else str(value)


def _plugins() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


if __name__ == "__main__":
    cli()
