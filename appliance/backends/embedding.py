"""The interface of an engine serving an embedding model: tokenize, then one batched forward + pooling.

It lives in the runner process, as a generating backend does, and is picked by model format through a
registry of its own (a model's kind, chat or embedding, says which registry). An embedding model keeps
no state between batches: every call of ``embed`` is a new set of sequences, pooled per sequence and
L2-normalised, so a text's vector is the same alone or in any batch.
"""

from __future__ import annotations

import abc

import numpy as np

from appliance.backends.base import ModelFacts
from appliance.backends.registry import resolve

# model format -> "module:Class", imported only when an embedding model of that format is loaded
_REGISTRY: dict[str, str | type[EmbeddingBackend]] = {
    "gguf": "appliance.backends.llama_cpp:LlamaCppEmbedder",
    "onnx": "appliance.backends.onnx_embedding:OnnxEmbedder",
}


class EmbeddingBackend(abc.ABC):
    """``load`` reports ``ModelFacts`` with ``n_slots`` = most sequences one ``embed`` call takes, ``n_batch`` =
    most tokens it takes, ``context_length`` = most tokens of one input, and ``info["dimensions"]``."""

    name: str = ""

    def __init__(self, model_path, threads: int, context_length: int):
        self.model_path = model_path
        self.threads = threads
        self.requested_context_length = context_length

    @abc.abstractmethod
    def load(self) -> ModelFacts: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, with the model's own start and end tokens (BERT: [CLS] ... [SEP])."""

    @abc.abstractmethod
    def embed(self, sequences: list[list[int]]) -> bytes:
        """One vector per sequence, pooled and L2-normalised: float32 little-endian, one after another."""


def normalised_bytes(vectors: np.ndarray) -> bytes:
    """Pooled vectors (one per row) as ``embed`` returns them: L2-normalised float32 little-endian."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype("<f4").tobytes()


def register_embedder(model_format: str, backend: str | type[EmbeddingBackend]) -> None:
    _REGISTRY[model_format] = backend


def create_embedder(model_format: str, model_path, threads: int, context_length: int) -> EmbeddingBackend:
    cls = resolve(_REGISTRY, model_format, "embedding models")
    return cls(model_path, threads=threads, context_length=context_length)
