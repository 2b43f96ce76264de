"""llama.cpp through llama-cpp-python's low-level API: GGUF models, memory-mapped, batched over slots.

One context holds one KV cache stream per slot. ``step``
fills one reused ``llama_batch`` (a token of every generating sequence plus
prompt chunks), calls ``llama_decode`` once, and samples each sequence with
its own ``llama_sampler`` chain in C. Traps kept in mind: a context is used
from the step thread only; a logits pointer is valid only until the next
decode (sampling happens right after it); positions continue each sequence.
"""

from __future__ import annotations

import ctypes
import random
import re
from pathlib import Path

from appliance.backends import cxx_runtime

cxx_runtime.preload_cxx_runtime()  # before llama.cpp's libraries load: see cxx_runtime

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp import _logger as llama_logger  # noqa: E402

from appliance.backends.base import (Backend, BackendError, Feed, ModelFacts, SamplingParams, banned_or,
                                     token_logprob)
from appliance.backends.embedding import EmbeddingBackend, normalised_bytes
from appliance.backends.llama_report import captured_log, load_report
from appliance.grammar import apply_mask
from models.formats import GGUF_FILE_TYPES

N_BATCH = 512  # tokens per decode: a prompt longer than this is fed in chunks between decode steps
# The engine settings a model may have (appliance.config's gpu_layers, flash_attn, main_gpu, tensor_split,
# kv_cache_type), with what llama.cpp itself would do.
ENGINE_DEFAULTS = {"gpu_layers": "auto", "flash_attn": "auto", "main_gpu": 0, "tensor_split": (), "kv_cache_type": "f16"}
FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def _tokenize(vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    room = len(data) + 8
    tokens = (llama_cpp.llama_token * room)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, room, add_special, parse_special)
    if n < 0:
        raise BackendError(f"llama.cpp could not tokenize {len(data)} bytes")
    return tokens[:n]


def _free(engine) -> None:
    """Free what a llama.cpp engine (generating or embedding) holds: its batch, context and model, once."""
    if engine._batch is not None:
        llama_cpp.llama_batch_free(engine._batch)
        engine._batch = None
    if engine._ctx:
        llama_cpp.llama_free(engine._ctx)
        engine._ctx = None
    if engine._model:
        llama_cpp.llama_model_free(engine._model)
        engine._model = None


def _provider(report: dict) -> str:
    """cpu, or the GPU backend most layers run on (CUDA0 -> cuda)."""
    if not report["gpu_layers_offloaded"] or not report["device"] or report["device"].startswith("CPU"):
        return "cpu"
    return re.sub(r"\d+$", "", report["device"]).lower()


def gpu_layers(setting) -> int:
    """Layers to offload: auto is every layer (-1) where this build can offload, else none."""
    if setting == "auto":
        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    return int(setting)


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    options = tuple(ENGINE_DEFAULTS)  # the GPU and KV cache settings (appliance.config), per model

    def __init__(self, model_path, threads: int, context_length: int, n_slots: int, **engine):
        super().__init__(model_path, threads, context_length, n_slots)
        self.engine = ENGINE_DEFAULTS | engine
        self._model = self._ctx = self._vocab = None
        self._batch = None
        self._samplers: dict[int, ctypes.c_void_p] = {}
        self._logprobs: dict[int, int | None] = {}  # by slot: how many top logprobs its sequence asks for
        self._argmax: dict[int, bool] = {}  # by slot: is its chain greedy alone (see start_sequence)
        self._piece = ctypes.create_string_buffer(256)

    # -- lifecycle ---------------------------------------------------------
    def load(self) -> ModelFacts:
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        path = Path(self.model_path)
        with captured_log() as lines:  # what llama.cpp did with the settings, as it says
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), self._model_params())
            if not self._model:
                raise BackendError(f"llama.cpp could not load {path}: not a GGUF file it can read")
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            trained = llama_cpp.llama_n_ctx_train(self._model)
            # Never serve more context than the model was trained for.
            per_slot = min(self.requested_context_length, trained) if trained > 0 else self.requested_context_length
            self._ctx = llama_cpp.llama_init_from_model(self._model, self._context_params(per_slot))
        if not self._ctx:
            raise BackendError(f"llama.cpp could not make a context of {per_slot} x {self.n_slots} tokens for {path} "
                               f"(kv_cache_type {self.engine['kv_cache_type']}, flash_attn {self.engine['flash_attn']})")
        self._report = load_report(lines)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        return ModelFacts(context_length=per_slot, n_slots=self.n_slots, n_batch=N_BATCH, n_vocab=self._n_vocab,
                          info=self._info(path))

    def _model_params(self):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers(self.engine["gpu_layers"])
        params.main_gpu = self.engine["main_gpu"]
        split = self.engine["tensor_split"]
        if split:
            if len(split) > llama_cpp.llama_max_devices():
                raise BackendError(f"tensor_split has {len(split)} parts; this llama.cpp build takes at most "
                                   f"{llama_cpp.llama_max_devices()}")
            self._split = (ctypes.c_float * llama_cpp.llama_max_devices())(*split)  # kept alive with the model
            params.tensor_split = self._split
        return params

    def _context_params(self, per_slot: int):
        params = llama_cpp.llama_context_default_params()
        params.flash_attn_type = FLASH_ATTN[self.engine["flash_attn"]]
        params.type_k = params.type_v = KV_CACHE_TYPES[self.engine["kv_cache_type"]]
        params.n_ctx = per_slot * self.n_slots
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = self.n_slots
        params.n_threads = params.n_threads_batch = self.threads
        # One KV stream per slot, of exactly its context: attention then runs over each sequence's own cache,
        # so a sequence's greedy tokens are the same batched as alone (a unified cache changes the last
        # bits of the logits). The catch, a partial llama_memory_seq_cp aborting, does not apply: slots
        # copy each other's cache only whole (a prompt shared by n choices, the primed preamble).
        params.kv_unified = False
        params.no_perf = True
        return params

    def close(self) -> None:
        for sampler in self._samplers.values():
            llama_cpp.llama_sampler_free(sampler)
        self._samplers.clear()
        _free(self)

    def _info(self, path: Path) -> dict:
        file_type = self._meta("general.file_type")
        return {
            "backend": self.name,
            "architecture": self._meta("general.architecture"),
            "quantization": GGUF_FILE_TYPES.get(int(file_type), file_type) if file_type else None,
            "threads": self.threads,
            # where it runs as llama.cpp reports it; "gpu_layers" is what was asked, auto resolved
            "provider": _provider(self._report),
            **self._report,
            "gpu_layers": gpu_layers(self.engine["gpu_layers"]),
            "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
            "file": str(path),
        }

    def _meta(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:  # chat templates can be long
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    # -- tokens ------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return _tokenize(self._vocab, text, add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n] if n > 0 else b""

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def bos_token(self) -> int | None:
        return llama_cpp.llama_vocab_bos(self._vocab) if llama_cpp.llama_vocab_get_add_bos(self._vocab) else None

    def chat_template(self) -> tuple[str, str, str]:
        template = self._meta("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{self.model_path} has no chat template in its GGUF metadata; use /v1/completions")
        return template, self._special_text(llama_cpp.llama_vocab_bos), self._special_text(llama_cpp.llama_vocab_eos)

    def _special_text(self, which) -> str:
        token = which(self._vocab)
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # -- the step loop -----------------------------------------------------
    def start_sequence(self, slot: int, keep: int, params: SamplingParams) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, -1)
        old = self._samplers.pop(slot, None)
        if old is not None:
            llama_cpp.llama_sampler_free(old)
        self._samplers[slot] = _sampler_chain(params, self._n_vocab, self.requested_context_length)
        self._logprobs[slot] = params.logprobs
        # A chain of greedy alone keeps no state, so its token is the logits' first maximum, as llama.cpp's
        # greedy sampler picks it: numpy finds it ~10x faster than llama_sampler_sample, which first copies
        # the whole vocabulary into its candidate array (most of a step at 64 streams on a GPU).
        self._argmax[slot] = params.temperature <= 0 and not params.logit_bias and not params.penalizes

    def step(self, feeds: list[Feed], masks: dict[int, np.ndarray] | None = None) -> dict[int, int]:
        outputs = self._decode(feeds)
        sampled, self.logprobs = {}, {}
        also = {f.slot: f.also for f in feeds if f.also}
        for slot, index in outputs:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
            raw = logits.copy() if also.get(slot) or self._logprobs.get(slot) is not None else logits
            for sampler in (slot, *also.get(slot, ())):
                if sampler != slot:
                    logits[:] = raw  # each choice samples the prompt's logits as they came
                self._sample(sampler, logits, raw, index, (masks or {}).get(sampler), sampled)
        return sampled

    def _sample(self, slot: int, logits: np.ndarray, raw: np.ndarray, index: int, mask, sampled: dict) -> None:
        if mask is not None:  # the sampler chain reads these very logits: masked in place
            apply_mask(logits, mask)
        if self._argmax.get(slot):
            sampled[slot] = int(np.argmax(logits))
        else:
            sampled[slot] = llama_cpp.llama_sampler_sample(self._samplers[slot], self._ctx, index)
        if self._logprobs.get(slot) is not None:
            self.logprobs[slot] = token_logprob(raw, sampled[slot], self._logprobs[slot])

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def copy_sequence(self, source: int, target: int) -> None:
        # Whole streams only: with a stream per slot, llama.cpp copies a sequence to another stream whole
        # (a partial copy across streams aborts). The copy is applied at the next decode.
        llama_cpp.llama_memory_seq_rm(self._memory, target, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def _decode(self, feeds: list[Feed], every_position: bool = False) -> list[tuple[int, int]]:
        """One llama_decode of feeds; (slot, index in the batch) of every feed that samples. The logits are kept
        for those last tokens, or with every_position for every token."""
        batch, n = self._batch, 0
        outputs = []
        for feed in feeds:
            for i, token in enumerate(feed.tokens):
                batch.token[n] = token
                batch.pos[n] = feed.pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = feed.slot
                batch.logits[n] = every_position
                n += 1
            if feed.sample:
                batch.logits[n - 1] = 1
                outputs.append((feed.slot, n - 1))
        if n > N_BATCH:
            raise BackendError(f"a step of {n} tokens exceeds the batch of {N_BATCH}")
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise BackendError(f"llama_decode failed with status {status} (KV cache full or aborted)")
        return outputs

    # -- scoring -----------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        rows = []
        llama_cpp.llama_memory_seq_rm(self._memory, 0, 0, -1)
        try:
            for start in range(0, len(tokens), N_BATCH):
                chunk = tokens[start : start + N_BATCH]
                self._decode([Feed(0, chunk, start, sample=False)], every_position=True)
                # A logits pointer is valid only until the next decode: copied out at once.
                rows += [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, i), shape=(vocab,)).copy()
                         for i in range(len(chunk))]
        finally:
            llama_cpp.llama_memory_seq_rm(self._memory, 0, 0, -1)
        return np.array(rows, dtype=np.float32)


def _sampler_chain(params: SamplingParams, n_vocab: int, context_length: int):
    """llama.cpp's usual order: logit bias, penalties, top-k, top-p, min-p, temperature, then the seeded draw
    (or greedy at 0, after the bias and the penalties). llama_sampler_sample feeds each drawn token back
    to the chain, so the penalties see this request's own tokens."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if params.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
            *(llama_cpp.llama_logit_bias(token, banned_or(bias)) for token, bias in params.logit_bias))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    if params.penalizes:
        last_n = context_length if params.repeat_last_n < 0 else params.repeat_last_n
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_penalties(
            n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
    if params.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.randrange(2**32 - 1)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


# -- embedding models ----------------------------------------------------------------
EMBED_SEQUENCES = 128  # most inputs one embedding batch holds (llama.cpp allows up to 256)


class LlamaCppEmbedder(EmbeddingBackend):
    """A GGUF embedding model (BERT and kin) in llama.cpp's embedding mode: one decode per batch of sequences,
    pooled by llama.cpp as the model's header says (mean for all-MiniLM-L6-v2), then L2-normalised here.

    A separate path from ``LlamaCppBackend``: no KV cache to keep (encoder models have none), no sampler. One
    batch holds at most the model's trained context in tokens, and every token of a sequence in one batch, as
    a non-causal model needs."""

    name = "llama.cpp"

    def __init__(self, model_path, threads: int, context_length: int):
        super().__init__(model_path, threads, context_length)
        self._model = self._ctx = self._vocab = self._batch = self._memory = None

    def load(self) -> ModelFacts:
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        path = Path(self.model_path)
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self._model:
            raise BackendError(f"llama.cpp could not load {path}: not a GGUF file it can read")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        trained = llama_cpp.llama_model_n_ctx_train(self._model)
        self._n_batch = min(self.requested_context_length, trained) if trained > 0 else self.requested_context_length
        self._ctx = llama_cpp.llama_init_from_model(self._model, self._context_params())
        if not self._ctx:
            raise BackendError(f"llama.cpp could not make an embedding context of {self._n_batch} tokens for {path}")
        pooling = llama_cpp.llama_pooling_type(self._ctx)
        if pooling not in POOLING_NAMES:
            raise BackendError(f"{path} pools its vectors in no way this service serves (llama.cpp pooling type "
                               f"{pooling}): embedding models need mean, CLS or last-token pooling in their header")
        self._memory = llama_cpp.llama_get_memory(self._ctx)  # None for encoders; a decoder's is cleared per batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, EMBED_SEQUENCES)
        self._dims = llama_cpp.llama_model_n_embd(self._model)
        info = {"backend": self.name, "architecture": _meta(self._model, "general.architecture"),
                "quantization": _quantization(self._model), "threads": self.threads, "file": str(path),
                "dimensions": self._dims, "pooling": POOLING_NAMES[pooling]}
        return ModelFacts(context_length=self._n_batch, n_slots=EMBED_SEQUENCES, n_batch=self._n_batch,
                          n_vocab=llama_cpp.llama_vocab_n_tokens(self._vocab), info=info)

    def _context_params(self):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self._n_batch  # a sequence's tokens in one ubatch
        params.n_seq_max = EMBED_SEQUENCES
        params.kv_unified = True  # else llama.cpp splits n_ctx among the sequences
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # the model's own (its GGUF header)
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        return params

    def close(self) -> None:
        _free(self)

    def tokenize(self, text: str) -> list[int]:
        return _tokenize(self._vocab, text, add_special=True, parse_special=False)

    def embed(self, sequences: list[list[int]]) -> bytes:
        batch, n = self._batch, 0
        if len(sequences) > EMBED_SEQUENCES or sum(map(len, sequences)) > self._n_batch:
            raise BackendError(f"an embedding batch holds at most {EMBED_SEQUENCES} inputs of {self._n_batch} tokens")
        for seq, tokens in enumerate(sequences):
            for pos, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, 1
                batch.seq_id[n][0] = seq
                n += 1
        batch.n_tokens = n
        if self._memory:
            llama_cpp.llama_memory_clear(self._memory, True)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise BackendError(f"llama_decode failed with status {status}")
        # A pooled vector's pointer is valid only until the next decode: copied out at once.
        vectors = np.array([np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(self._ctx, seq), shape=(self._dims,))
                            for seq in range(len(sequences))], dtype=np.float32)
        return normalised_bytes(vectors)


POOLING_NAMES = {llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
                 llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls", llama_cpp.LLAMA_POOLING_TYPE_LAST: "last"}


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


def _quantization(model) -> str | None:
    file_type = _meta(model, "general.file_type")
    return GGUF_FILE_TYPES.get(int(file_type), file_type) if file_type else None
