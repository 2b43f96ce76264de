"""An embedding model (sentence-transformers BERT: a zip or folder) -> a GGUF model package, with its quality report.

The package is what ``appliance models add`` registers: the GGUF, ``manifest.json`` (kind ``embedding``) and
``report.json`` / ``report.md``. The GGUF is written at F32 by ``models.embedding_gguf`` (numpy and gguf only)
and quantized by llama.cpp's own quantizer (Q8_0 by default; Q4_0, Q4_K_M or IQ4_NL where the report says the
quality holds). The report compares the package's vectors with the fp32 model's on the committed sentence
pairs (``bench/embedding_pairs.tsv``): the Spearman correlation of the pair cosines (goal >= 0.99) and the
smallest cosine between a sentence's two vectors. The fp32 side is the F32 GGUF through the same engine: the
fp32 weights as they are (cosine >= 0.99999 against sentence-transformers, tests/test_embeddings_real.py), so
the figure is the quantization's cost alone. No torch is needed.

    python -m distill.export_embedding --out packages/minilm-q8 --quant Q8_0    # the bundled all-MiniLM-L6-v2
    python -m distill.export_embedding SOURCE.zip --name my-embedder --out packages/my-embedder-q8
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from distill.export_gguf import quantize_gguf
from models import bundled_embedding
from models.embedding_gguf import Source, convert
from models.manifest import sha256_file, write_manifest

PAIRS = Path(__file__).resolve().parent.parent / "bench" / "embedding_pairs.tsv"
GOAL_SPEARMAN = 0.99
UNQUANTIZED = ("F32", "F16")


def export(source: Path, out: Path, name: str, quant: str = "Q8_0", target: str = "cpu", threads: int = 2,
           pairs: Path = PAIRS) -> Path:
    """Write the package folder ``out``; returns it. Its report holds the quality against fp32."""
    out.mkdir(parents=True, exist_ok=False)
    gguf = out / f"{name}.{quant}.gguf"
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = convert(source, Path(scratch) / "fp32.gguf", name=name, out_type="F32")
        if quant in UNQUANTIZED:
            convert(source, gguf, name=name, out_type=quant)
        else:
            quantize_gguf(fp32, gguf, quant, threads=threads)
        quality = compare(gguf, fp32, read_pairs(pairs), threads)
    quality |= {"pairs_file": pairs.name, "pairs_sha256": sha256_file(pairs), "size_bytes": gguf.stat().st_size,
                "goal_spearman": GOAL_SPEARMAN, "meets_goal": quality["spearman_vs_fp32"] >= GOAL_SPEARMAN}
    (out / "report.json").write_text(json.dumps(quality, indent=2) + "\n")
    (out / "report.md").write_text(report_md(name, quant, quality))
    config = Source(source).json("config.json")
    write_manifest(out, name=name, architecture=config.get("model_type", "bert"), format="gguf", quantization=quant,
                   target=target, context_length=config.get("max_position_embeddings", 512), kind="embedding",
                   source={"model": str(source), "sha256": _source_sha256(source)},
                   metrics={"spearman_vs_fp32": quality["spearman_vs_fp32"],
                            "min_cosine_vs_fp32": quality["min_cosine_vs_fp32"]})
    return out


def _source_sha256(source: Path) -> str | dict:
    return sha256_file(source) if source.is_file() else {p.name: sha256_file(p) for p in sorted(source.glob("*"))
                                                         if p.is_file()}


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [tuple(line.split("\t")) for line in lines]


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks with ties given their mean rank, as Spearman's rho needs."""
    values = np.asarray(values)
    ranks = np.empty(len(values))
    ranks[values.argsort(kind="stable")] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def vectors(gguf: Path, texts: list[str], threads: int) -> dict[str, np.ndarray]:
    """Each text's vector from llama.cpp's embedding mode, as the service computes it."""
    from appliance.backends.embedding import create_embedder

    engine = create_embedder("gguf", gguf, threads=threads, context_length=512)
    engine.load()
    try:
        rows = [np.frombuffer(engine.embed([engine.tokenize(t) for t in texts[i : i + 32]]), dtype="<f4")
                for i in range(0, len(texts), 32)]
    finally:
        engine.close()
    return dict(zip(texts, np.concatenate(rows).reshape(len(texts), -1)))


def compare(gguf: Path, fp32: Path, pairs, threads: int) -> dict:
    texts = sorted({t for _, a, b in pairs for t in (a, b)})
    ours, ref = vectors(gguf, texts, threads), vectors(fp32, texts, threads)
    ours_cos = [float(ours[a] @ ours[b]) for _, a, b in pairs]
    ref_cos = [float(ref[a] @ ref[b]) for _, a, b in pairs]
    return {"pairs": len(pairs), "sentences": len(texts), "spearman_vs_fp32": round(spearman(ours_cos, ref_cos), 5),
            "min_cosine_vs_fp32": round(min(float(ours[t] @ ref[t]) for t in texts), 5),
            "max_pair_cosine_diff": round(max(abs(x - y) for x, y in zip(ours_cos, ref_cos)), 5)}


def report_md(name: str, quant: str, q: dict) -> str:
    verdict = "meets" if q["meets_goal"] else "MISSES"
    return f"""# {name} ({quant}): quality against the fp32 model

- Spearman correlation of the cosines of {q['pairs']} sentence pairs ({q['pairs_file']}) with the fp32 model's:
  **{q['spearman_vs_fp32']}** ({verdict} the goal of >= {q['goal_spearman']})
- smallest cosine between a sentence's vector and its fp32 vector ({q['sentences']} sentences): {q['min_cosine_vs_fp32']}
- largest change of a pair's cosine: {q['max_pair_cosine_diff']}
- file: {q['size_bytes']:,} bytes

The fp32 side is the F32 GGUF in the same engine (the fp32 weights as they are), so these figures are the cost of
the quantization alone.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?", help="zip or folder; default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--out", type=Path, required=True, help="the package folder to write (must not exist)")
    parser.add_argument("--name", default=None, help="the model's name on the box (default: the source's)")
    parser.add_argument("--quant", default="Q8_0", help="Q8_0 (default), Q4_0, Q4_K_M, IQ4_NL, F16 or F32")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    source = args.source or bundled_embedding.source_zip()
    if source is None:
        raise SystemExit(f"no source given and the bundled embedding model is not installed: {bundled_embedding.INSTALL}")
    name = args.name or (f"{bundled_embedding.NAME}-{args.quant.lower()}" if args.source is None else source.stem)
    folder = export(source, args.out, name, args.quant, args.target, args.threads)
    print((folder / "report.md").read_text())


if __name__ == "__main__":
    main()
