"""ONNX Runtime: decoder graphs with a KV cache (fp32, fp16 or INT4 MatMulNBits), torch-free.

A model is a package folder (see ``models/README.md``) holding ``model.onnx``
in optimum's ``text-generation-with-past`` layout, its external weights,
``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` and
``manifest.json``. Only onnxruntime, numpy, tokenizers and jinja2 run here.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from appliance.backends.base import Backend, BackendError, SamplingParams
from appliance.backends.hf_tokenizer import HfTokenizer
from models.manifest import CACHE_DIR, ManifestError, read_manifest

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# "auto" prefers CUDA over TensorRT: TensorRT has no INT4 MatMulNBits kernel and
# builds engines for minutes on the first start; ask for it by name to use it.
AUTO_ORDER = ("cuda", "cpu")
GRAPH = "model.onnx"
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.NoSuchFile, ort_state.InvalidProtobuf,
              ort_state.InvalidGraph, ort_state.NotImplemented, ort_state.RuntimeException, ort_state.EPFail)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options = ("provider",)  # extra settings create_backend passes to this backend

    def __init__(self, model_path, threads: int, context_length: int, provider: str = "auto"):
        super().__init__(model_path, threads, context_length)
        if provider not in (*PROVIDERS, "auto"):
            raise BackendError(f"unknown execution provider {provider!r}: use one of auto, {', '.join(PROVIDERS)}")
        self.requested_provider = provider
        self.provider: str | None = None
        self._session: ort.InferenceSession | None = None

    # -- lifecycle ---------------------------------------------------------
    def load(self) -> None:
        if self._session is not None:
            return
        folder = Path(self.model_path)
        try:
            self.manifest = read_manifest(folder)
            self._read_model_files(folder)
            self._session, self.provider = self._open_session(folder)
        except BackendError:
            raise
        except (ManifestError, OSError, ValueError, *ORT_ERRORS) as exc:
            raise BackendError(f"onnxruntime could not load {folder}: {exc}") from exc
        self._graph = _GraphSignature(self._session)

    def _read_model_files(self, folder: Path) -> None:
        self.config = _read_json(folder / "config.json")
        self.generation_config = _read_json(folder / "generation_config.json", required=False)
        self.tokenizer_config = _read_json(folder / "tokenizer_config.json", required=False)
        self.tokenizer = HfTokenizer(folder)
        template_file = folder / "chat_template.jinja"  # transformers >= 4.43 may write it apart
        self._template = self.tokenizer_config.get("chat_template") or (
            template_file.read_text(encoding="utf-8") if template_file.exists() else None
        )
        self._eog_ids = self._end_of_generation_ids()

    def _open_session(self, folder: Path) -> tuple[ort.InferenceSession, str]:
        candidates = self._provider_candidates()
        for provider in candidates[:-1]:
            try:
                return self._session_for(folder, provider), provider
            except ORT_ERRORS as exc:
                log.warning("provider auto: %s failed to start (%s); trying %s", provider, exc, candidates[-1])
        return self._session_for(folder, candidates[-1]), candidates[-1]

    def _provider_candidates(self) -> list[str]:
        available = ort.get_available_providers()
        if self.requested_provider != "auto":
            if PROVIDERS[self.requested_provider] not in available:
                raise BackendError(
                    f"execution provider {self.requested_provider!r} is not in this onnxruntime build "
                    f"(it offers {', '.join(available)}); install onnxruntime-gpu or set provider = 'auto'"
                )
            return [self.requested_provider]
        usable = [p for p in AUTO_ORDER if PROVIDERS[p] in available]
        if usable == ["cpu"]:
            log.warning("provider auto: using CPU, this onnxruntime build offers only %s", ", ".join(available))
        return usable

    def _session_for(self, folder: Path, provider: str) -> ort.InferenceSession:
        graph, options, cache = self._session_options(folder, provider)
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        session = ort.InferenceSession(str(graph), sess_options=options, providers=providers)
        if cache is not None:
            # Renamed only once whole, so a start killed half-way never leaves a broken cache behind.
            Path(options.optimized_model_filepath).replace(cache)
        return session

    def _session_options(self, folder: Path, provider: str) -> tuple[Path, ort.SessionOptions, Path | None]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Shapes change every step (the KV cache grows), so planned memory patterns never get reused.
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        cached = _optimized_graph_path(folder, self.manifest.file(GRAPH).sha256, provider)
        if cached.exists():
            # Already optimized for this provider and onnxruntime version: skip the slow graph passes.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return cached, options, None
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not _writable(cached.parent):
            return folder / GRAPH, options, None
        options.optimized_model_filepath = str(cached.with_suffix(".partial"))
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", cached.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return folder / GRAPH, options, cached

    def unload(self) -> None:
        self._session = None
        self.provider = None

    @property
    def is_loaded(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise BackendError("model is not loaded")
        return self._session

    @property
    def context_length(self) -> int:
        self.session  # raises when not loaded
        trained = int(self.config.get("max_position_embeddings") or self.manifest.context_length)
        return min(self.requested_context_length, trained)

    # -- tokens ------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        self.session
        tokens = self.tokenizer.encode(text, add_special)
        bos = self._special_id("bos_token")
        # A chat template that writes the BOS text itself would otherwise give two.
        if bos is not None and len(tokens) >= 2 and tokens[0] == tokens[1] == bos:
            tokens = tokens[1:]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog_ids

    def _end_of_generation_ids(self) -> frozenset[int]:
        ids = set()
        for source in (self.generation_config, self.config):
            value = source.get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        eos = self._special_id("eos_token")
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    def _special_text(self, key: str) -> str:
        value = self.tokenizer_config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def _special_id(self, key: str) -> int | None:
        text = self._special_text(key)
        return self.tokenizer.token_id(text) if text else None

    def chat_template(self) -> tuple[str, str, str]:
        self.session
        if not self._template:
            raise BackendError(f"{self.model_path} has no chat template in tokenizer_config.json; use /v1/completions")
        return self._template, self._special_text("bos_token"), self._special_text("eos_token")

    # -- generation --------------------------------------------------------
    def sample_tokens(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        rng = np.random.default_rng(params.seed if params.seed is not None else random.randrange(2**63))
        decoder = _Decoder(self.session, self._graph, on_gpu=self.provider in ("cuda", "tensorrt"))
        logits = decoder.step(prompt)
        while True:
            token = pick_token(logits, params, rng)
            yield token
            logits = decoder.step([token])

    def info(self) -> dict:
        info = super().info()
        if self.is_loaded:
            info.update(
                architecture=self.manifest.architecture,
                quantization=self.manifest.quantization,
                threads=self.threads,
                provider=self.provider,
            )
        return info


class _GraphSignature:
    """What the decoder graph takes and gives: names, KV cache shape and dtype."""

    def __init__(self, session: ort.InferenceSession):
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        _, self.kv_heads, _, self.head_dim = first.shape
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32


class _Decoder:
    """One generation's KV cache, kept where the graph runs (on the GPU under CUDA) between steps."""

    def __init__(self, session: ort.InferenceSession, graph: _GraphSignature, on_gpu: bool):
        self.session, self.graph = session, graph
        self.device = "cuda" if on_gpu else "cpu"
        self.length = 0  # tokens already in the cache
        empty = np.zeros((1, graph.kv_heads, 0, graph.head_dim), dtype=graph.kv_dtype)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device) for _ in graph.past_names]

    def step(self, tokens: list[int]) -> np.ndarray:
        """Run tokens through the model; the logits of the last one."""
        binding = self.session.io_binding()
        total = self.length + len(tokens)
        binding.bind_cpu_input("input_ids", np.array([tokens], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self.graph.has_position_ids:
            binding.bind_cpu_input("position_ids", np.arange(self.length, total, dtype=np.int64)[None])
        for name, value in zip(self.graph.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.graph.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = outputs[1:]
        self.length = total
        return outputs[0].numpy()[0, -1].astype(np.float32)


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """llama.cpp's sampler chain: greedy at temperature 0, else top-k, top-p, temperature, draw."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    candidates = _top_k(logits, params.top_k)
    chosen = logits[candidates].astype(np.float64)
    if params.top_p < 1.0:
        probs = _softmax(chosen)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        candidates, chosen = candidates[:keep], chosen[:keep]
    probs = _softmax(chosen / params.temperature)
    return int(candidates[rng.choice(len(candidates), p=probs)])


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, largest first (all of them when k <= 0)."""
    if 0 < k < len(logits):
        part = np.argpartition(-logits, k - 1)[:k]
        return part[np.argsort(-logits[part], kind="stable")]
    return np.argsort(-logits, kind="stable")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise ManifestError(f"model package {path.parent} lacks {path.name}")
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _optimized_graph_path(folder: Path, graph_sha256: str, provider: str) -> Path:
    return folder / CACHE_DIR / f"{GRAPH[:-5]}.{provider}.ort{ort.__version__}.{graph_sha256[:12]}.onnx"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)
