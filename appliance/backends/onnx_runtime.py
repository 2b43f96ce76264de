"""ONNX Runtime: decoder graphs with a KV cache (fp32, fp16 or INT4 MatMulNBits), batched over slots, torch-free.

A model is a package folder (see ``models/README.md``) holding ``model.onnx``
in optimum's ``text-generation-with-past`` layout (inputs ``input_ids``,
``attention_mask``, optional ``position_ids``, ``past_key_values.N.key/value``;
outputs ``logits``, ``present.N.key/value``), its external weights,
``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` and
``manifest.json``. Only onnxruntime, numpy, tokenizers and jinja2 run here.

Each slot keeps its own KV cache. A step runs every prompt chunk alone
(batch 1), then the next token of all generating sequences in one batched
run: each past left-padded to the longest, the padding masked out, every
sequence at its own positions. While the same sequences keep decoding, one
step's batched present is the next step's past as it is (no copying); the
batch is re-packed only when a sequence joins or leaves it.

A folder written by ONNX Runtime GenAI's model builder (``genai_config.json``,
GroupQueryAttention) is served the same way: ``models.builder_folder`` reads
its facts, and its caches are right-padded instead, as GroupQueryAttention
wants (each row's positions first; its length is its attention mask's sum).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from appliance.backends.base import (Backend, BackendError, Feed, ModelFacts, SamplingParams, TokenLogprob, banned_or,
                                     token_logprob)
from appliance.backends.hf_tokenizer import HfTokenizer
from appliance.grammar import apply_mask
from models.builder_folder import BuilderModel, check_graph_inputs, is_builder_folder, read_builder_model
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
N_BATCH = 512  # most tokens one step feeds: the scheduler prefills a longer prompt in chunks between steps
# Free positions a right-padded batch is packed with past its longest row: steps decoded in place before a re-pack.
KV_HEADROOM = 64
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.NoSuchFile, ort_state.InvalidProtobuf,
              ort_state.InvalidGraph, ort_state.NotImplemented, ort_state.RuntimeException, ort_state.EPFail)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options = ("provider",)  # extra settings create_backend passes to this backend

    def __init__(self, model_path, threads: int, context_length: int, n_slots: int = 1, provider: str = "auto"):
        super().__init__(model_path, threads, context_length, n_slots)
        if provider not in (*PROVIDERS, "auto"):
            raise BackendError(f"unknown execution provider {provider!r}: use one of auto, {', '.join(PROVIDERS)}")
        self.requested_provider = provider
        self.provider: str | None = None
        self._session: ort.InferenceSession | None = None
        self._caches: dict[int, _Cache] = {}
        self._samplers: dict[int, SlotSampler] = {}
        self._bound: tuple | None = None  # the batch decoding in place, its binding and its logits array

    # -- lifecycle ---------------------------------------------------------
    def load(self) -> ModelFacts:
        folder = Path(self.model_path)
        try:
            self.manifest = read_manifest(folder)
            self._read_model_files(folder)
            self._session, self.provider = self._open_session(folder)
            self._graph = _GraphSignature(self._session, self._builder)
        except BackendError:
            raise
        except (ManifestError, OSError, ValueError, *ORT_ERRORS) as exc:
            raise BackendError(f"onnxruntime could not load {folder}: {exc}") from exc
        self._device = "cuda" if self.provider in ("cuda", "tensorrt") else "cpu"
        trained = int(self.config.get("max_position_embeddings") or self.manifest.context_length)
        return ModelFacts(context_length=min(self.requested_context_length, trained), n_slots=self.n_slots,
                          n_batch=N_BATCH, n_vocab=int(self.config.get("vocab_size") or 0), info=self._info(folder))

    def _read_model_files(self, folder: Path) -> None:
        self._builder = read_builder_model(folder) if is_builder_folder(folder) else None
        self.config = self._builder.hf_config() if self._builder else _read_json(folder / "config.json")
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

    def _info(self, folder: Path) -> dict:
        return {
            "backend": self.name,
            "architecture": self.manifest.architecture,
            "quantization": self.manifest.quantization,
            "threads": self.threads,
            "provider": self.provider,
            "file": str(folder / GRAPH),
        }

    def close(self) -> None:
        self._caches.clear()
        self._samplers.clear()
        self._bound = None
        self._session = None
        self.provider = None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise BackendError("model is not loaded")
        return self._session

    # -- tokens ------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog_ids

    @property
    def bos_token(self) -> int | None:
        return self.tokenizer.added_bos

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
        if not self._template:
            raise BackendError(f"{self.model_path} has no chat template in tokenizer_config.json; use /v1/completions")
        return self._template, self._special_text("bos_token"), self._special_text("eos_token")

    # -- the step loop -----------------------------------------------------
    def start_sequence(self, slot: int, keep: int, params: SamplingParams) -> None:
        cache = self._cache(slot)
        if keep > cache.length:
            raise BackendError(f"slot {slot} holds {cache.length} tokens, {keep} cannot be kept")
        if keep == 0:
            self._caches[slot] = self._empty_cache()
        elif keep < cache.length or cache.shared:
            self._caches[slot] = cache.detached(keep)
        self._samplers[slot] = SlotSampler(params, self.requested_context_length)

    def step(self, feeds: list[Feed], masks: dict[int, np.ndarray] | None = None) -> dict[int, int]:
        for feed in feeds:
            self._check(feed)
        decoding = [f for f in feeds if len(f.tokens) == 1]
        # A graph without position_ids numbers positions itself, which left padding would shift: one at a time.
        batches = [decoding] if self._graph.batches_decodes else [[f] for f in decoding]
        last_logits = {}
        for batch in filter(None, batches):
            last_logits.update(zip((f.slot for f in batch), self._decode(batch)))
        # GroupQueryAttention prefills prompts that start empty slots together, each row right-padded.
        fresh = [f for f in feeds if len(f.tokens) > 1 and f.pos == 0] if self._graph.right_padded else []
        if len(fresh) > 1:
            last_logits.update(self._prefill_together(fresh))
        for feed in feeds:
            if len(feed.tokens) > 1 and not (len(fresh) > 1 and feed in fresh):
                last_logits[feed.slot] = self._prefill(feed)
        masks = masks or {}
        sampled = {slot: self._samplers[slot].sample(last_logits[f.slot], masks.get(slot))
                   for f in feeds if f.sample for slot in (f.slot, *f.also)}
        self.logprobs = {slot: self._samplers[slot].logprob for slot in sampled if self._samplers[slot].logprob}
        return sampled

    def clear(self) -> None:
        self._caches.clear()
        self._bound = None

    def copy_sequence(self, source: int, target: int) -> None:
        self._caches[target] = self._cache(source).detached()

    def _check(self, feed: Feed) -> None:
        if not feed.tokens:
            raise BackendError(f"slot {feed.slot}: a feed without tokens")
        if feed.sample and feed.slot not in self._samplers:
            raise BackendError(f"slot {feed.slot} was never started")
        length = self._cache(feed.slot).length
        if feed.pos != length:
            raise BackendError(f"slot {feed.slot}: position {feed.pos} does not continue its {length} tokens")

    def _prefill(self, feed: Feed) -> np.ndarray:
        """One prompt chunk alone; the logits of its last token."""
        cache = self._cache(feed.slot)
        past = cache.detached().values if cache.shared else cache.values
        n, total = len(feed.tokens), cache.length + len(feed.tokens)
        logits, present = self._run([feed.tokens], np.ones((1, total), np.int64),
                                    [list(range(feed.pos, feed.pos + n))], past)
        self._caches[feed.slot] = _Cache(present)
        return logits[0]

    def _prefill_together(self, feeds: list[Feed]) -> dict[int, np.ndarray]:
        """Whole prompts of empty slots in one run (right-padded: GroupQueryAttention attends each row over its own
        length, from the mask); the logits of each one's last token, by slot."""
        width = max(len(f.tokens) for f in feeds)
        ids = [f.tokens + [0] * (width - len(f.tokens)) for f in feeds]
        mask = _right_padded_mask([len(f.tokens) - 1 for f in feeds], width)
        empty = self._empty_cache().values
        past = [np.repeat(v, len(feeds), axis=0) for v in empty]
        logits, present = self._run(ids, mask, [list(range(width))] * len(feeds), past, every_position=True)
        for row, feed in enumerate(feeds):
            self._caches[feed.slot] = _Cache(present, row, 0, len(feed.tokens))
        return {f.slot: logits[row, len(f.tokens) - 1] for row, f in enumerate(feeds)}

    def _decode(self, feeds: list[Feed]) -> np.ndarray:
        """One-token feeds (generating sequences) in one batched run; the logits, a row per feed."""
        caches = [self._cache(f.slot) for f in feeds]
        lengths = [c.length for c in caches]
        past, pads = self._batched_past(caches, {f.slot for f in feeds})
        right = self._graph.right_padded
        if right:
            mask = _right_padded_mask(lengths, max(lengths) + 1)
        else:
            mask = _left_padded_mask(pads, _shape(past[0])[2] + 1)
        if right and self._device == "cpu":  # GroupQueryAttention writes into the past's own buffers: no copy a step
            logits, present = self._run_in_place([f.tokens for f in feeds], mask, [[f.pos] for f in feeds], past), past
        else:
            logits, present = self._run([f.tokens for f in feeds], mask, [[f.pos] for f in feeds], past)
        for row, (feed, pad, length) in enumerate(zip(feeds, pads, lengths)):
            self._caches[feed.slot] = _Cache(present, row, 0, length + 1) if right else _Cache(present, row, pad)
        return logits

    def _batched_past(self, caches: list[_Cache], slots: set[int]) -> tuple[list, list[int]]:
        """The past of a batch and each row's left padding."""
        first = caches[0].values
        same_batch = _shape(first[0])[0] == len(caches) and all(
            c.values is first and c.row == row for row, c in enumerate(caches))
        if self._graph.right_padded:  # and room for this step's token in every row
            same_batch = same_batch and max(c.length for c in caches) < _shape(first[0])[2]
        if same_batch:  # the same sequences as the last step: its present is their past as it is
            return first, [c.pad for c in caches]
        # Idle slots would otherwise keep whole old batches alive for the few rows they hold.
        for slot, cache in self._caches.items():
            if slot not in slots and cache.shared:
                self._caches[slot] = cache.detached()
        return _pack(caches, self._graph.kv_dtype, self._graph.right_padded)

    def _run(self, input_ids: list[list[int]], mask: np.ndarray, positions: list[list[int]],
             past: list, every_position: bool = False) -> tuple[np.ndarray, list]:
        """One forward pass; the logits (float32, a row per sequence: its last position's, or with every_position
        a row per position) and the present."""
        graph, binding = self._graph, self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if graph.has_position_ids:
            binding.bind_cpu_input("position_ids", np.array(positions, dtype=np.int64))
        for name, value in zip(graph.past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in graph.present_names:
            binding.bind_output(name, self._device)  # the cache stays where the graph runs
        try:
            self.session.run_with_iobinding(binding)
        except ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed a step of {len(input_ids)} sequences: {exc}") from exc
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        return (logits if every_position else logits[:, -1]).astype(np.float32), outputs[1:]

    def _run_in_place(self, input_ids: list[list[int]], mask: np.ndarray, positions: list[list[int]],
                      past: list[np.ndarray]) -> np.ndarray:
        """One decode step of a right-padded batch whose new keys and values GroupQueryAttention writes into the
        past arrays themselves (past and present bound to the same memory); the last position's logits."""
        binding, logits = self._in_place_binding(past)
        binding.bind_cpu_input("input_ids", np.array(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self._graph.has_position_ids:
            binding.bind_cpu_input("position_ids", np.array(positions, dtype=np.int64))
        try:
            self.session.run_with_iobinding(binding)
        except ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed a step of {len(input_ids)} sequences: {exc}") from exc
        return logits[:, -1].astype(np.float32)

    def _in_place_binding(self, past: list[np.ndarray]) -> tuple[ort.IOBinding, np.ndarray]:
        """The binding of a batch's arrays as both past and present, and of an array for its logits, made once
        while the same batch decodes: binding them anew, or wrapping every output (get_outputs), costs 1-2 ms
        of a 15 ms step."""
        if self._bound is None or self._bound[0] is not past:
            graph, binding = self._graph, self.session.io_binding()
            logits = np.empty((_shape(past[0])[0], 1, graph.vocab), graph.logits_dtype)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            for past_name, present_name, array in zip(graph.past_names, graph.present_names, past):
                value = ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: the array's memory, not a copy
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_ortvalue_output(present_name, value)
            self._bound = (past, binding, logits)
        return self._bound[1], self._bound[2]

    def _cache(self, slot: int) -> _Cache:
        if slot not in self._caches:
            self._caches[slot] = self._empty_cache()
        return self._caches[slot]

    def _empty_cache(self) -> _Cache:
        graph = self._graph
        empty = np.zeros((1, graph.kv_heads, 0, graph.head_dim), dtype=graph.kv_dtype)
        return _Cache([empty] * len(graph.past_names))

    # -- scoring -----------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        # From an empty past of its own: no slot's cache is read or changed.
        positions = [list(range(len(tokens)))]
        logits, _ = self._run([tokens], np.ones((1, len(tokens)), np.int64), positions, self._empty_cache().values,
                              every_position=True)
        return logits[0]


class _GraphSignature:
    """What the decoder graph takes and gives: names, KV cache shape and dtype."""

    def __init__(self, session: ort.InferenceSession, builder: BuilderModel | None = None):
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        _, self.kv_heads, _, self.head_dim = first.shape
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        # GroupQueryAttention takes each row's length from the mask and its positions from that length.
        self.right_padded = builder is not None
        self.batches_decodes = self.has_position_ids or self.right_padded
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        if builder is not None:
            check_graph_inputs({n: i.type for n, i in inputs.items()})
            self.kv_heads, self.head_dim = builder.kv_heads, builder.head_size  # the graph leaves head_dim symbolic
            self.vocab = builder.vocab_size


@dataclass
class _Cache:
    """One slot's KV cache: row ``row`` of per-layer arrays [rows, kv_heads, width, head_dim] (numpy, or
    the OrtValues a run left on its device), whose positions from ``pad`` on are the slot's: the last
    ``width - pad`` (left-padded batches), or the first ``size`` (right-padded, pad 0)."""

    values: list
    row: int = 0
    pad: int = 0
    size: int | None = None

    @property
    def length(self) -> int:
        return _shape(self.values[0])[2] - self.pad if self.size is None else self.size

    @property
    def shared(self) -> bool:
        """Part of a batch's arrays, not arrays of its own."""
        return _shape(self.values[0])[0] > 1 or self.pad > 0 or self.length < _shape(self.values[0])[2]

    def detached(self, keep: int | None = None) -> _Cache:
        """Its first ``keep`` positions (all by default) copied into arrays of its own."""
        end = self.pad + (self.length if keep is None else keep)
        return _Cache([_host(v)[self.row : self.row + 1, :, self.pad : end].copy() for v in self.values])


def _pack(caches: list[_Cache], dtype, right: bool = False) -> tuple[list[np.ndarray], list[int]]:
    """The caches as one batch, each left-padded (or right-padded) with zeros to the longest; and each one's
    left padding."""
    width = max(c.length for c in caches) + (KV_HEADROOM if right else 0)
    pads = [0 if right else width - c.length for c in caches]
    hosts: dict[int, list[np.ndarray]] = {}  # each distinct set of arrays brought to the host once
    for c in caches:
        if id(c.values) not in hosts:
            hosts[id(c.values)] = [_host(v) for v in c.values]
    _, kv_heads, _, head_dim = _shape(caches[0].values[0])
    past = []
    for layer in range(len(caches[0].values)):
        # Zeros, not garbage: masked positions still go through the attention's matmul.
        batch = np.zeros((len(caches), kv_heads, width, head_dim), dtype=dtype)
        for row, (c, pad) in enumerate(zip(caches, pads)):
            batch[row, :, pad : pad + c.length] = hosts[id(c.values)][layer][c.row, :, c.pad : c.pad + c.length]
        past.append(batch)
    return past, pads


def _left_padded_mask(pads: list[int], width: int) -> np.ndarray:
    mask = np.ones((len(pads), width), np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def _right_padded_mask(lengths: list[int], width: int) -> np.ndarray:
    """Each row's past and its new token first, then padding."""
    return (np.arange(width)[None, :] <= np.array(lengths)[:, None]).astype(np.int64)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


def _host(value) -> np.ndarray:
    """A numpy view of a cache array (a copy when it lives on a GPU)."""
    return value if isinstance(value, np.ndarray) else value.numpy()


class SlotSampler:
    """One sequence's sampling: its settings, its seeded draws and the tokens it generated (for the penalties)."""

    def __init__(self, params: SamplingParams, context_length: int):
        self.params = params
        self.rng = np.random.default_rng(params.seed)  # no seed: numpy draws a fresh one from the OS
        self.last_n = context_length if params.repeat_last_n < 0 else params.repeat_last_n
        self.generated: list[int] = []
        self.logprob: TokenLogprob | None = None  # of the last sampled token, when the params ask

    def sample(self, logits: np.ndarray, mask: np.ndarray | None = None) -> int:
        params, raw = self.params, logits
        if params.logit_bias or params.penalizes or mask is not None:
            logits = logits.astype(np.float32, copy=True)
            if mask is not None:
                apply_mask(logits, mask)
            for token, bias in params.logit_bias:
                logits[token] += banned_or(bias)
            if params.penalizes:
                penalize(logits, self.generated[-self.last_n:], params)
        token = pick_token(logits, params, self.rng)
        self.generated.append(token)
        self.logprob = token_logprob(raw, token, params.logprobs) if params.logprobs is not None else None
        return token


def penalize(logits: np.ndarray, recent: list[int], params: SamplingParams) -> None:
    """llama.cpp's penalties sampler on ``recent``, in place: repeat, then frequency and presence."""
    if not recent:
        return
    tokens, counts = np.unique(np.asarray(recent), return_counts=True)
    chosen = logits[tokens]
    chosen = np.where(chosen <= 0, chosen * params.repeat_penalty, chosen / params.repeat_penalty)
    logits[tokens] = chosen - counts * params.frequency_penalty - params.presence_penalty


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """llama.cpp's sampler chain: greedy at temperature 0, else top-k, top-p, min-p, temperature, draw."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    candidates = _top_k(logits, params.top_k)
    chosen = logits[candidates].astype(np.float64)
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(_softmax(chosen)), params.top_p)) + 1
        candidates, chosen = candidates[:keep], chosen[:keep]
    if params.min_p > 0.0:
        # Largest first, so the tokens at least min_p times as likely as the best one are a prefix.
        keep = int(np.count_nonzero(chosen >= chosen[0] + np.log(params.min_p)))
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
