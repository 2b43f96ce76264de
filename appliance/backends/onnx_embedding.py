"""An embedding model as an ONNX package (``distill.export_embedding --format onnx``) in ONNX Runtime.

The package's graph takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the model has
them) and returns one pooled, L2-normalised vector per row, as ``embeddings``: the pooling was put into the
graph at export, as the model's sentence-transformers config says. This side pads, runs and normalises again.

ONNX Runtime pads every row of a run to the longest one, so a batch is run in rows of similar length: sorted
by length and cut into groups of at most ``RUN_ROWS`` rows and ``RUN_TOKENS`` padded tokens. Its matrix products
beat llama.cpp's F32 ones on an AVX2 CPU, where a GGUF model was slower than sentence-transformers at batch 32
(bench/results/embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort  # imported here: a box without the [onnx] extra gets the registry's clear error
from tokenizers import Tokenizer

from appliance.backends.base import BackendError, ModelFacts
from appliance.backends.embedding import EmbeddingBackend, normalised_bytes

MAX_SEQUENCES = 128  # most inputs one embed call takes, as the GGUF embedder
RUN_ROWS = 32  # rows of one ONNX Runtime run: similar lengths, little padding
RUN_TOKENS = 4096  # padded tokens of one run: the attention scores grow with rows x length^2


class OnnxEmbedder(EmbeddingBackend):
    name = "onnxruntime"

    def __init__(self, model_path, threads: int, context_length: int):
        super().__init__(model_path, threads, context_length)
        self._session = self._tokenizer = None

    def load(self) -> ModelFacts:
        folder = Path(self.model_path)
        try:
            config = json.loads((folder / "config.json").read_text())
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
            self._session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a missing file, bad JSON, or ONNX Runtime's own exception types
            raise BackendError(f"ONNX Runtime could not load the embedding package {folder}: {exc}") from None
        # The box checks each input's length itself: the tokenizer's own padding or truncation would hide it.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._inputs = {i.name for i in self._session.get_inputs()}
        trained = int(config.get("max_position_embeddings", self.requested_context_length))
        self._context = min(self.requested_context_length, trained)
        self._dims = int(self._session.get_outputs()[0].shape[-1])
        self._pad = int(config.get("pad_token_id") or 0)
        info = {"backend": self.name, "architecture": config.get("model_type"), "threads": self.threads,
                "file": str(folder / "model.onnx"), "dimensions": self._dims, "pooling": "in the graph"}
        # A step of the runner's loop is a few runs at most, so a small request waits little behind a big one.
        return ModelFacts(context_length=self._context, n_slots=MAX_SEQUENCES, n_batch=max(RUN_TOKENS, self._context),
                          n_vocab=self._tokenizer.get_vocab_size(with_added_tokens=True), info=info)

    def close(self) -> None:
        self._session = None

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def embed(self, sequences: list[list[int]]) -> bytes:
        if len(sequences) > MAX_SEQUENCES or any(len(s) > self._context for s in sequences):
            raise BackendError(f"an embedding batch holds at most {MAX_SEQUENCES} inputs of {self._context} tokens each")
        vectors = np.empty((len(sequences), self._dims), dtype=np.float32)
        for rows in _runs(sequences):
            vectors[rows] = self._run([sequences[i] for i in rows])
        return normalised_bytes(vectors)

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        ids = np.full((len(rows), max(map(len, rows))), self._pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        try:
            return self._session.run(["embeddings"], feed)[0]
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise BackendError(f"ONNX Runtime failed on an embedding batch: {exc}") from None


def _runs(sequences: list[list[int]]) -> list[list[int]]:
    """Indices of the sequences in groups of similar length, shortest first, each within one run's limits."""
    groups: list[list[int]] = []
    for i in sorted(range(len(sequences)), key=lambda i: len(sequences[i])):
        group = groups[-1] if groups else None
        if group is None or len(group) == RUN_ROWS or (len(group) + 1) * len(sequences[i]) > RUN_TOKENS:
            groups.append([i])
        else:
            group.append(i)
    return groups
