"""``appliance bundle``: registered as a plugin command (setup.cfg, entry point group appliance.commands)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from installer.bundle import PLATFORMS, ROOT, PYTHONS, BundleError, Options, Target, build, project_version

_HOST_PLATFORM = f"linux_{os.uname().machine}" if f"linux_{os.uname().machine}" in PLATFORMS else "linux_x86_64"
_HOST_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


@click.command()
@click.option("--platform", "platform_", type=click.Choice(sorted(PLATFORMS)), default=_HOST_PLATFORM,
              show_default=True, help="the target box's platform")
@click.option("--python", "python", type=click.Choice(PYTHONS),
              default=_HOST_PYTHON if _HOST_PYTHON in PYTHONS else "3.10", show_default=True,
              help="the target's Python (JetPack 5/6: 3.8/3.10; use 3.10)")
@click.option("--gpu", is_flag=True, help="onnxruntime-gpu instead of onnxruntime; install.sh builds llama.cpp with CUDA")
@click.option("--models", "models", multiple=True, metavar="NAME|PATH",
              help="a catalog name or a model package folder; repeat for several (the default model always comes)")
@click.option("--no-default-model", is_flag=True, help="leave out the bundled default model (SmolLM2-135M)")
@click.option("--no-embedding-model", is_flag=True,
              help="leave out the bundled embedding model (all-MiniLM-L6-v2, converted to GGUF here: 90 MB)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="the tar to write [default: appliance-VERSION-PLATFORM.tar]")
@click.option("--sign", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="KEYFILE",
              help="Ed25519 private key (PEM) to sign SHA256SUMS with")
@click.option("--extra-wheels", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="wheels a site brings itself (e.g. a Jetson onnxruntime-gpu); preferred where they fit")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=ROOT,
              help="the project checkout to bundle (e.g. a release tag's worktree) [default: this checkout]")
@click.option("--no-prebuilt-llama", is_flag=True,
              help="never add this machine's llama-cpp-python build; the target always compiles it")
def bundle(platform_, python, gpu, models, no_default_model, no_embedding_model, out, sign, extra_wheels, source,
           no_prebuilt_llama):
    """Build an air-gapped install bundle (one tar) on a connected machine.

    It holds every wheel the target needs, llama-cpp-python's source and build tools, the models,
    SHA256SUMS (signed with --sign) and install.sh. pip's cache is reused, so a second bundle
    downloads little. On the target: tar xf BUNDLE.tar && sudo ./appliance-*/install.sh
    """
    target = Target(platform_, python, gpu)
    out = out or Path(f"appliance-{project_version(source)}-{platform_}.tar")
    if no_default_model and not models:
        raise click.UsageError("--no-default-model needs at least one --models")
    opts = Options(target=target, out=out, models=models, sign=sign, extra_wheels=extra_wheels,
                   prebuilt_llama=not no_prebuilt_llama, source=source.resolve(), default_model=not no_default_model,
                   embedding_model=not no_embedding_model, log=lambda line: click.echo(line, err=True))
    try:
        build(opts)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from None
