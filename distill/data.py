"""Text in, fixed-length token blocks out: read files, tokenize, pack, split, cache.

Documents are split into train and held-out by a hash of their name (relative
to the folder or glob they come from), so no held-out block shares a document
with training and the split is the same on every machine. Each split is concatenated
(EOS between documents) and cut into blocks of ``block_size`` tokens; the
tail shorter than a block is dropped. Blocks are cached as a uint16 (or uint32) .npy pair
under out_dir/data/ with a manifest saying what they were built from.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from distill.config import ConfigError, DistillConfig

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json"}


def generated_path(cfg: DistillConfig) -> Path:
    return cfg.out / "data" / "generated.jsonl"


def expand_sources(patterns: list[str]) -> list[tuple[Path, str]]:
    """(file, name) of every file the patterns name: a file, a folder (recursively, text suffixes only) or a glob.

    A name is the file's path relative to its source (the folder, the fixed part of the glob, or just
    the file's own name), so the split, which hashes names, is the same wherever the data lives.
    """
    files: list[tuple[Path, str]] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            files += _named(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES), path)
        elif path.is_file():
            files.append((path, path.name))
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"data: {pattern!r} matches no file")
            files += _named(matches, _glob_base(path))
    return files


def _named(files: list[Path], base: Path) -> list[tuple[Path, str]]:
    return [(f, f.relative_to(base).as_posix()) for f in files]


def _glob_base(pattern: Path) -> Path:
    """The folder a glob starts from: its parts before the first one with a wildcard."""
    return Path(*itertools.takewhile(lambda part: not glob.has_magic(part), pattern.parts))


def data_sources(cfg: DistillConfig) -> list[str]:
    return cfg.data or [str(generated_path(cfg))]


def read_documents(cfg: DistillConfig):
    """(source index, name, text); a JSONL line is one document, any other file is one document."""
    if not cfg.data and not generated_path(cfg).exists():
        raise ConfigError("no data: give --data FILES, or run `distill generate --generate-n N` first")
    for source, pattern in enumerate(data_sources(cfg)):
        yield from ((source, name, text) for name, text in _read_source(pattern, cfg.text_field))


def _read_source(pattern: str, text_field: str):
    for path, name in expand_sources([pattern]):
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        record = json.loads(line)
                        if text_field not in record:
                            raise ConfigError(f"{path}:{i + 1}: no {text_field!r} key (set --text-field)")
                        yield f"{name}:{i}", record[text_field]
        else:
            yield name, path.read_text(encoding="utf-8", errors="replace")


def is_heldout(name: str, fraction: float) -> bool:
    """Held out or not, by the document's name alone: the same split whatever the seed, the run or the machine."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def heldout_split(source: int) -> str:
    """The split that holds one source's held-out documents alone (the sources' order in --data)."""
    return f"val{source}"


def tokenize_split(cfg: DistillConfig, tokenizer) -> dict[str, np.ndarray]:
    """{'train': blocks, 'val': blocks}, each an int array of shape (n, block_size).

    With several data sources, 'val0', 'val1', ... hold each source's held-out documents too, so the
    report can score, say, real code and teacher-generated text apart.
    """
    sources = data_sources(cfg)
    streams = {"train": [], "val": []} | ({heldout_split(i): [] for i in range(len(sources))} if len(sources) > 1 else {})
    eos = tokenizer.eos_token_id
    total = 0
    for source, name, text in read_documents(cfg):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        if is_heldout(name, cfg.val_fraction):
            streams["val"].append(ids)
            streams.get(heldout_split(source), []).append(ids)
        else:
            streams["train"].append(ids)
        total += len(ids)
        if cfg.max_tokens and total >= cfg.max_tokens:
            break
    blocks = {}
    for split, docs in streams.items():
        dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32  # half the memory for <= 64k vocabularies
        flat = np.fromiter((t for d in docs for t in d), dtype=dtype)
        n = len(flat) // cfg.block_size
        blocks[split] = flat[: n * cfg.block_size].reshape(n, cfg.block_size)
    if len(blocks["train"]) == 0 or len(blocks["val"]) == 0:
        raise ConfigError(
            f"data too small: {len(blocks['train'])} train and {len(blocks['val'])} held-out blocks of "
            f"{cfg.block_size} tokens; add text, lower --block-size or raise --val-fraction"
        )
    return blocks


def data_manifest(cfg: DistillConfig, tokenizer) -> dict:
    return {
        "sources": data_sources(cfg),
        "text_field": cfg.text_field,
        "block_size": cfg.block_size,
        "val_fraction": cfg.val_fraction,
        "max_tokens": cfg.max_tokens,
        "vocab_size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
    }


def load_blocks(cfg: DistillConfig, tokenizer) -> dict[str, np.ndarray]:
    """Blocks from the cache when it was built from the same settings, else built and cached."""
    folder = Path(cfg.data_cache) if cfg.data_cache else cfg.out / "data"
    manifest = data_manifest(cfg, tokenizer)
    meta = folder / "blocks.json"
    if meta.exists() and json.loads(meta.read_text()).get("manifest") == manifest:
        return {s: np.load(folder / f"{s}.npy") for s in json.loads(meta.read_text())["tokens"]}
    blocks = tokenize_split(cfg, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    for split, arr in blocks.items():
        np.save(folder / f"{split}.npy", arr)
    counts = {s: int(a.size) for s, a in blocks.items()}
    meta.write_text(json.dumps({"manifest": manifest, "tokens": counts}, indent=2))
    return blocks


def batch_indices(n_blocks: int, batch_size: int, seed: int, step: int, micro: int, rank: int) -> np.ndarray:
    """Which blocks a micro-batch holds: a pure function of its position, so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step, micro, rank])
    return rng.integers(0, n_blocks, size=batch_size)
