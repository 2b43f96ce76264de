"""What a model is for: ``chat`` (generates text) or ``embedding`` (turns text into vectors).

A package says so in its manifest; a GGUF file says so in its header: llama.cpp's encoder
architectures (BERT and its kin) and any file that names a pooling type are embedding models.
"""

from __future__ import annotations

import struct
from pathlib import Path

from models.footprint import gguf_metadata

CHAT, EMBEDDING = "chat", "embedding"
KINDS = (CHAT, EMBEDDING)
# llama.cpp architectures that only embed (no causal language-model head)
EMBEDDING_ARCHITECTURES = {"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
                           "jina-bert-v3", "eurobert", "t5encoder"}


def gguf_kind(path: Path) -> str:
    """The kind a GGUF's header says; chat when it cannot be read (loading it will say what is wrong)."""
    try:
        meta = gguf_metadata(Path(path))
    except (OSError, ValueError, struct.error, MemoryError, OverflowError):
        return CHAT
    arch = meta.get("general.architecture")
    if arch in EMBEDDING_ARCHITECTURES or meta.get(f"{arch}.pooling_type", 0) not in (0, None):
        return EMBEDDING
    return CHAT


def gguf_dimensions(path: Path | None) -> int | None:
    """The width of a GGUF embedding model's vectors, from its header (None when it cannot be read)."""
    try:
        meta = gguf_metadata(Path(path)) if path is not None else {}
    except (OSError, ValueError, struct.error, MemoryError, OverflowError):
        return None
    return meta.get(f"{meta.get('general.architecture')}.embedding_length")
