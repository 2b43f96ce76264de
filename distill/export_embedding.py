"""An embedding model (sentence-transformers BERT: a zip or folder) -> a GGUF or ONNX model package, with its
quality report.

The package is what ``appliance models add`` registers: the model, ``manifest.json`` (kind ``embedding``) and
``report.json`` / ``report.md``.
- GGUF (the default; no torch needed): written at F32 by ``models.embedding_gguf`` (numpy and gguf only) and
  quantized by llama.cpp's own quantizer (Q8_0 by default; Q4_0, Q4_K_M or IQ4_NL where the report says the
  quality holds).
- ONNX (``--format onnx``; the export needs torch, the box only ONNX Runtime): the graph with its pooling, F32 or
  INT8 (``distill.export_embedding_onnx``). On an AVX2 CPU ONNX Runtime embeds faster than llama.cpp's F32 and
  than sentence-transformers (bench/results/embeddings).

The report compares the package's vectors with the fp32 model's on the committed sentence pairs
(``bench/embedding_pairs.tsv``): the Spearman correlation of the pair cosines (goal >= 0.99) and the smallest
cosine between a sentence's two vectors. The fp32 side is the F32 GGUF through llama.cpp: the fp32 weights as
they are (cosine >= 0.99999 against sentence-transformers, tests/test_embeddings_real.py).

    python -m distill.export_embedding --out packages/minilm-q8 --quant Q8_0    # the bundled all-MiniLM-L6-v2
    python -m distill.export_embedding --format onnx --out packages/minilm-onnx  # F32, served by ONNX Runtime
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
           pairs: Path = PAIRS, fmt: str = "gguf") -> Path:
    """Write the package folder ``out``; returns it. Its report holds the quality against fp32."""
    if fmt == "onnx":
        from distill.export_embedding_onnx import check

        check(source, quant)
    out.mkdir(parents=True, exist_ok=False)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = convert(source, Path(scratch) / "fp32.gguf", name=name, out_type="F32")
        if fmt == "onnx":
            from distill.export_embedding_onnx import write_onnx

            write_onnx(source, out, quant)
            model = out / "model.onnx"
        else:
            model = out / f"{name}.{quant}.gguf"
            if quant in UNQUANTIZED:
                convert(source, model, name=name, out_type=quant)
            else:
                quantize_gguf(fp32, model, quant, threads=threads)
        quality = compare(fmt, out if fmt == "onnx" else model, fp32, read_pairs(pairs), threads)
    quality |= {"pairs_file": pairs.name, "pairs_sha256": sha256_file(pairs), "size_bytes": model.stat().st_size,
                "goal_spearman": GOAL_SPEARMAN, "meets_goal": quality["spearman_vs_fp32"] >= GOAL_SPEARMAN}
    (out / "report.json").write_text(json.dumps(quality, indent=2) + "\n")
    (out / "report.md").write_text(report_md(name, f"{fmt.upper()} {quant}", quality))
    config = Source(source).json("config.json")
    write_manifest(out, name=name, architecture=config.get("model_type", "bert"), format=fmt, quantization=quant,
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


def vectors(fmt: str, path: Path, texts: list[str], threads: int) -> dict[str, np.ndarray]:
    """Each text's vector from the box's embedding engine for the format, as the service computes it."""
    from appliance.backends.embedding import create_embedder

    engine = create_embedder(fmt, path, threads=threads, context_length=512)
    engine.load()
    try:
        rows = [np.frombuffer(engine.embed([engine.tokenize(t) for t in texts[i : i + 32]]), dtype="<f4")
                for i in range(0, len(texts), 32)]
    finally:
        engine.close()
    return dict(zip(texts, np.concatenate(rows).reshape(len(texts), -1)))


def compare(fmt: str, model: Path, fp32: Path, pairs, threads: int) -> dict:
    texts = sorted({t for _, a, b in pairs for t in (a, b)})
    ours, ref = vectors(fmt, model, texts, threads), vectors("gguf", fp32, texts, threads)
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
the quantization (and, for ONNX, the other engine) alone.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?", help="zip or folder; default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--out", type=Path, required=True, help="the package folder to write (must not exist)")
    parser.add_argument("--name", default=None, help="the model's name on the box (default: the source's)")
    parser.add_argument("--format", dest="fmt", choices=("gguf", "onnx"), default="gguf",
                        help="gguf (llama.cpp; no torch needed) or onnx (ONNX Runtime; the export needs torch)")
    parser.add_argument("--quant", default=None, help="GGUF: Q8_0 (default), Q4_0, Q4_K_M, IQ4_NL, F16 or F32; "
                                                      "ONNX: F32 (default) or INT8")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    quant = args.quant or ("F32" if args.fmt == "onnx" else "Q8_0")
    source = args.source or bundled_embedding.source_zip()
    if source is None:
        raise SystemExit(f"no source given and the bundled embedding model is not installed: {bundled_embedding.INSTALL}")
    suffix = f"onnx-{quant.lower()}" if args.fmt == "onnx" else quant.lower()
    name = args.name or (f"{bundled_embedding.NAME}-{suffix}" if args.source is None else source.stem)
    from distill.export_embedding_onnx import EmbeddingExportError

    try:
        folder = export(source, args.out, name, quant, args.target, args.threads, fmt=args.fmt)
    except EmbeddingExportError as exc:
        raise SystemExit(f"error: {exc}") from None
    print((folder / "report.md").read_text())


if __name__ == "__main__":
    main()
