"""The ``distill`` command group (also mounted as ``appliance distill``).

Every setting of distill/config.py is a flag here too; precedence is
defaults < --config TOML file < flags.
"""

from __future__ import annotations

import os

import click

from distill.config import FIELDS, ConfigError, field_default, field_help, load_config

# Training and evaluation never touch the network: models and data are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _option(name: str):
    flag = "--" + name.replace("_", "-")
    default = field_default(name)
    text = f"{field_help(name)} [default: {default!r}]"
    if isinstance(default, bool):
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=text)
    if isinstance(default, (list, dict)):
        return click.option(flag, name, default=None, metavar="JSON", help=text)
    return click.option(flag, name, type=type(default), default=None, help=text)


def config_options(func):
    """One flag per config field, plus --config; the command receives a loaded DistillConfig as `cfg`."""
    for name in reversed(list(FIELDS)):
        func = _option(name)(func)
    func = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="TOML config file")(func)
    return func


def _load(config_path, flags):
    try:
        return load_config(config_path, flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


EPILOG = """\b
Examples:
  python -m distill generate --config distill/configs/smollm2.toml --generate-n 2000
  python -m distill train --config distill/configs/smollm2.toml --baseline
  accelerate launch --num_processes 2 -m distill train --config distill/configs/smollm2.toml
  python -m distill eval --config distill/configs/smollm2.toml
"""


class _Group(click.Group):
    """Setting problems found while running (data too small, a bad layer list) end as one-line errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, epilog=EPILOG)
def distill():
    """Distil a causal LM (the teacher) into a smaller one (the student).

    \b
    teacher   an HF folder or a GGUF file (loaded and dequantized by transformers)
    student   the teacher's every k-th layer (depth), narrower layers (width), or a config
    loss      alpha * KL(teacher||student) * T^2 + (1 - alpha) * CE  [+ hidden-state cosine]
    output    OUT_DIR/student: an HF folder (safetensors, config, tokenizer + chat template)
              OUT_DIR/report.{md,json,png}: held-out perplexity, agreement with the teacher
    """


@distill.command()
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint in OUT_DIR/checkpoints")
@config_options
def train(resume, config_path, **flags):
    """Build the student, distil it (and a CE-only baseline with --baseline), evaluate, report.

    Runs as is on CPU or one GPU; on several GPUs start it with `accelerate launch`.
    """
    from distill.pipeline import run_train

    run_train(_load(config_path, flags), resume=resume)


@distill.command(name="eval")
@config_options
def eval_(config_path, **flags):
    """Evaluate OUT_DIR/student (and OUT_DIR/baseline) against the teacher; rewrite the report.

    Give it the same --config and data flags as `train` (--data, --block-size, --val-fraction)
    so that it scores the same held-out blocks.
    """
    from distill.pipeline import run_eval

    run_eval(_load(config_path, flags))


@distill.command()
@config_options
def generate(config_path, **flags):
    """Sample --generate-n texts from the teacher into OUT_DIR/data/generated.jsonl (the default data)."""
    from distill.pipeline import run_generate

    cfg = _load(config_path, flags)
    if cfg.generate_n < 1:
        raise click.UsageError("set --generate-n N (how many texts to sample)")
    click.echo(f"wrote {run_generate(cfg)}")


@distill.command()
@config_options
def student(config_path, **flags):
    """Build the student only and print both parameter counts (a dry run of the architecture)."""
    from distill.pipeline import describe_params
    from distill.student import build_student
    from distill.teacher import load_teacher

    cfg = _load(config_path, flags)
    teacher = load_teacher(cfg.teacher)
    model, layer_map = build_student(teacher, cfg)
    describe_params(teacher, model)
    if layer_map:
        click.echo(f"layers kept from the teacher: {layer_map}")
