"""The click command ``appliance export``, registered in appliance/cli.py."""

from __future__ import annotations

from pathlib import Path

import click

from distill.export import ALGORITHMS
from distill.targets import GGUF_QUANT_TYPES, TARGETS


@click.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(list(TARGETS)), default="cpu", show_default=True,
              help="deployment target; profiles in distill/targets.py")
@click.option("--format", "fmt", type=click.Choice(["onnx", "gguf", "both"]), default="both", show_default=True,
              help="'both': every format the target serves")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for the packages (OUT/<name>-<target>-<format>)")
@click.option("--name", help="model name in the manifests [default: MODEL_DIR's name]")
@click.option("--algorithm", type=click.Choice(list(ALGORITHMS)), default="rtn", show_default=True,
              help="4-bit rounding: rtn (round to nearest, no data), hqq (ONNX only, no data); calibrated: "
                   "gptq (ONNX, and the GGUF rows llama.cpp keeps in Q4_0/Q5_0/IQ4_NL), qat (as gptq, fine-tuned through "
                   "the rounding: minutes on a GPU), imatrix (GGUF only: llama.cpp's importance matrix)")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="gptq, qat, imatrix: a text file to calibrate on [default: the model's own answers to varied prompts]")
@click.option("--held-out", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a text file to compare the packages' perplexity with the source's on, as text of the kind the "
                   "box will see (its first 2048 tokens) [default: a built-in page of English prose]")
@click.option("--gguf-quant", type=click.Choice(list(GGUF_QUANT_TYPES)),
              help="llama.cpp quant type instead of the target's (e.g. Q4_0 for an older llama.cpp)")
@click.option("--calibration-sequences", type=click.IntRange(1), metavar="N",
              help="gptq, qat, imatrix: sequences of 256 tokens to calibrate on [default: 256 for qat, 64 otherwise]")
@click.option("--qat-steps", type=click.IntRange(1), metavar="N",
              help="qat: fine-tuning steps of 8 sequences [default: 1000]")
@click.option("--no-report", is_flag=True, help="skip the measurements (perplexity, agreement, speed, RSS)")
@click.option("-t", "--threads", type=int, default=2, show_default=True, help="threads for quantizing and measuring")
@click.option("--serving", "serving", multiple=True, metavar="OPTION=VALUE", callback=lambda ctx, param, v: _serving(v),
              help="how the box should serve the packages, recorded in their manifests (the site's model_settings "
                   "still win): parallel=N slots, context_length=N tokens per slot, threads=N, keep_alive=SECONDS; "
                   "repeat for each")
def export_command(model_dir, target, fmt, out, name, algorithm, calibration, held_out, gguf_quant, calibration_sequences,
                   qat_steps, no_report, threads, serving):
    """Export an HF model folder to INT4 model packages for one target, each with a report.

    \b
    Example:
      appliance export ./student --target arm --format both --out ./packages
      appliance models add ./packages/student-arm-gguf
      appliance export ./student --target gpu --algorithm gptq --out ./packages
      appliance export ./student --target arm --format gguf --algorithm imatrix --out ./packages
      appliance export ./student --target jetson --serving parallel=4 --serving context_length=2048 --out ./packages
    """
    from distill.export import ExportError, ExportRequest, export
    from distill.targets import UnknownTarget

    request = ExportRequest(src=model_dir, out=out, target=target, format=fmt, name=name, algorithm=algorithm,
                            calibration=calibration, held_out=held_out, gguf_quant=gguf_quant, calibration_sequences=calibration_sequences,
                            qat_steps=qat_steps, measure=not no_report, threads=threads, serving=serving)
    try:
        packages = export(request, progress=lambda line: click.echo(line, err=True))
    except (ExportError, UnknownTarget) as exc:
        raise click.ClickException(str(exc)) from None
    for package in packages:
        click.echo(package)


def _serving(pairs: tuple[str, ...]) -> dict:
    """parallel=4 -> {"parallel": 4}, checked now rather than once the packages are written."""
    from models.manifest import ManifestError, check_serving

    serving = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            serving[name.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: expected OPTION=NUMBER, e.g. parallel=4", param_hint="--serving") from None
    try:
        check_serving(serving, "--serving")
    except ManifestError as exc:
        raise click.BadParameter(str(exc).removeprefix("--serving: "), param_hint="--serving") from None
    return serving


if __name__ == "__main__":  # `python -m distill.export_cli`: a source tree that is not installed has no entry point
    export_command()
