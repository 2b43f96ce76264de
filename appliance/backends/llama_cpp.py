"""llama.cpp through llama-cpp-python: GGUF models, memory-mapped."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

from appliance.backends.base import Backend, BackendError, SamplingParams
from distill.targets import GGUF_QUANT_TYPES


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(self, model_path, threads: int, context_length: int):
        super().__init__(model_path, threads, context_length)
        self._llm: llama_cpp.Llama | None = None

    def load(self) -> None:
        if self._llm is not None:
            return
        path = Path(self.model_path)
        try:
            llm = self._open(path, self.requested_context_length)
            trained = llm._model.n_ctx_train()
            if 0 < trained < self.requested_context_length:
                # Never serve more context than the model was trained for; mmap makes the reopen cheap.
                llm.close()
                llm = self._open(path, trained)
            self._llm = llm
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"llama.cpp could not load {path}: {exc}") from exc

    def _open(self, path: Path, n_ctx: int) -> llama_cpp.Llama:
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_threads=self.threads, n_threads_batch=self.threads, use_mmap=True, verbose=False
        )

    def unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def release_cache(self) -> None:
        if self._llm is not None:
            self._llm._ctx.kv_cache_clear()
            self._llm.reset()

    @property
    def is_loaded(self) -> bool:
        return self._llm is not None

    @property
    def llm(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise BackendError("model is not loaded")
        return self._llm

    @property
    def context_length(self) -> int:
        return self.llm.n_ctx()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
        bos = self.llm.token_bos()
        # A chat template that writes the BOS text itself would otherwise give two.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == bos:
            tokens = tokens[1:]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return self.llm.detokenize([token])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def sample_tokens(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        if params.seed is not None:
            # Reusing a cached prompt prefix changes the batch shapes of the prefill and with them
            # the last bits of the logits; a seeded request must not depend on what ran before it.
            self.llm.reset()
        self.llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        return self.llm.generate(
            prompt,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=0.0,
            repeat_penalty=1.0,
        )

    def chat_template(self) -> tuple[str, str, str]:
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{self.model_path} has no chat template in its GGUF metadata; use /v1/completions")
        return template, self._token_text(meta, "bos"), self._token_text(meta, "eos")

    def _token_text(self, meta: dict, which: str) -> str:
        token_id = meta.get(f"tokenizer.ggml.{which}_token_id")
        if token_id is None:
            return ""
        return self.llm.detokenize([int(token_id)], special=True).decode("utf-8", errors="replace")

    def info(self) -> dict:
        info = super().info()
        if self.is_loaded:
            meta = self.llm.metadata
            info.update(
                architecture=meta.get("general.architecture"),
                quantization=_FILE_TYPES.get(meta.get("general.file_type"), meta.get("general.file_type")),
                threads=self.threads,
                provider="cpu" if not llama_cpp.llama_supports_gpu_offload() else "gpu-capable",
            )
        return info


# general.file_type values (llama_ftype) of the types the appliance ships or exports, as llama.cpp names them.
_FILE_TYPES = {str(ftype): name for name, ftype in GGUF_QUANT_TYPES.items()}
