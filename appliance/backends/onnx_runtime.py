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

Everything stays where the graph runs. With the CUDA execution provider the
present and the logits are bound to the GPU, re-packing and detaching a
slot's cache run as small graphs there (``ort_graphs``), and only the chosen
tokens cross to the host, with the last position's logits only for a
sequence that samples other than greedily. On the CPU the same step loop
does those with numpy (``_HostHelpers``), which measured faster there.

A folder written by ONNX Runtime GenAI's model builder (``genai_config.json``,
GroupQueryAttention) is served the same way: ``models.builder_folder`` reads
its facts, and its caches are right-padded instead, as GroupQueryAttention
wants (each row's positions first; its length is its attention mask's sum).
On the CPU such a batch decodes in place (past and present the same arrays),
and while the same greedy sequences go on, through the binding it made once.

On the CPU and with CUDA the session runs the package's graph changed by
``ort_graphs.picking_logits`` where it applies: the LM head runs only for the
positions whose logits are read (a prompt's last; every one when scoring), and
the graph gives their argmax too.
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
from appliance.backends.ort_graphs import (LOGIT_POSITIONS, LOGITS_ARGMAX, concat_graph, head_graph, picking_logits,
                                          window_graph)
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
# Providers whose sessions run the graph changed by ort_graphs.picking_logits (tests/test_onnx_cuda.py on a GPU).
# TensorRT builds engines for the graph it is given: it keeps the package's.
PICKING_PROVIDERS = ("cpu", "cuda")
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
        self.fallback: str | None = None  # why auto did not get the first provider it tried, when it did not
        self._session: ort.InferenceSession | None = None
        self._caches: dict[int, _Cache] = {}
        self._samplers: dict[int, SlotSampler] = {}
        self._bound: _Bound | None = None  # the batch decoding in place on the CPU

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
        self._helpers = _helpers_for(self._graph, self._device, self.threads)
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
            except (*ORT_ERRORS, _ProviderDeclined) as exc:
                self.fallback = f"provider auto: {provider} failed to start ({exc}); using {candidates[-1]}"
                log.warning("%s", self.fallback)
        try:
            return self._session_for(folder, candidates[-1]), candidates[-1]
        except _ProviderDeclined as exc:
            raise BackendError(f"execution provider {candidates[-1]!r} did not start: {exc}") from exc

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
            self.fallback = f"provider auto: using CPU, this onnxruntime build offers only {', '.join(available)}"
            log.warning("%s", self.fallback)
        return usable

    def _session_for(self, folder: Path, provider: str) -> ort.InferenceSession:
        graph, options, cache = self._session_options(folder, provider)
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        if session.get_providers()[0] != PROVIDERS[provider]:
            # onnxruntime-gpu on a box without a usable GPU (no driver, no device, a CUDA library missing) starts
            # the session on the CPU instead, saying so only in its own log.
            if cache is not None:
                Path(options.optimized_model_filepath).unlink(missing_ok=True)
            raise _ProviderDeclined(f"onnxruntime started it on {', '.join(session.get_providers())} instead")
        if cache is not None:
            # Renamed only once whole, so a start killed half-way never leaves a broken cache behind.
            Path(options.optimized_model_filepath).replace(cache)
            # Older caches of this provider and onnxruntime version (other versions may be another install's).
            for stale in cache.parent.glob(f"{GRAPH[:-5]}.{provider}.ort{ort.__version__}.*"):
                if stale.name not in (cache.name, f"{cache.name}.data") and stale.suffix != ".partial":
                    stale.unlink(missing_ok=True)
        return session

    def _session_options(self, folder: Path, provider: str) -> tuple[str | bytes, ort.SessionOptions, Path | None]:
        """The graph a session starts from (the cached optimized one, else the package's, changed to pick its
        logits' positions where it can), its options, and where its optimized graph is to be cached."""
        options = _base_options(self.threads)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        cached = _optimized_graph_path(folder, self.manifest.file(GRAPH).sha256, provider)
        if cached.exists():
            # Already optimized for this provider and onnxruntime version: skip the slow graph passes.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return str(cached), options, None
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph = (provider in PICKING_PROVIDERS and picking_logits((folder / GRAPH).read_bytes())) or str(folder / GRAPH)
        if isinstance(graph, bytes):  # its external weights are still beside the package's graph
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        if not _writable(cached.parent):
            return graph, options, None
        options.optimized_model_filepath = str(cached.with_suffix(".partial"))
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", cached.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return graph, options, cached

    def _info(self, folder: Path) -> dict:
        return {
            "backend": self.name,
            "architecture": self.manifest.architecture,
            "quantization": self.manifest.quantization,
            "threads": self.threads,
            "provider": self.provider,
            "provider_fallback": self.fallback,
            "kv_cache_device": self._device,
            "file": str(folder / GRAPH),
        }

    def close(self) -> None:
        self._caches.clear()
        self._samplers.clear()
        self._bound = None
        self._session = None
        self._helpers = None
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
            self._caches[slot] = self._detached(cache, keep)
        self._samplers[slot] = SlotSampler(params, self.requested_context_length)

    def step(self, feeds: list[Feed], masks: dict[int, np.ndarray] | None = None) -> dict[int, int]:
        if not masks and self._bound is not None and self._bound.continues(feeds, self._caches, self._samplers):
            return self._decode_bound(feeds)
        for feed in feeds:
            self._check(feed)
        masks = masks or {}
        # Per feed: None (no sampling), False (greedy: the argmax is enough), True (the logits must cross).
        wants = {f.slot: any(self._samplers[s].needs_logits(masks.get(s)) for s in (f.slot, *f.also))
                 if f.sample else None for f in feeds}
        decoding = [f for f in feeds if len(f.tokens) == 1]
        # A graph without position_ids numbers positions itself, which left padding would shift: one at a time.
        batches = [decoding] if self._graph.batches_decodes else [[f] for f in decoding]
        heads: dict[int, tuple] = {}
        for batch in filter(None, batches):
            heads.update(self._decode(batch, [wants[f.slot] for f in batch]))
        # GroupQueryAttention prefills prompts that start empty slots together, each row right-padded.
        fresh = [f for f in feeds if len(f.tokens) > 1 and f.pos == 0] if self._graph.right_padded else []
        if len(fresh) > 1:
            heads.update(self._prefill_together(fresh, [wants[f.slot] for f in fresh]))
        for feed in feeds:
            if len(feed.tokens) > 1 and not (len(fresh) > 1 and feed in fresh):
                heads[feed.slot] = self._prefill(feed, wants[feed.slot])
        sampled = {slot: self._samplers[slot].sample(*heads[f.slot], masks.get(slot))
                   for f in feeds if f.sample for slot in (f.slot, *f.also)}
        self.logprobs = {slot: self._samplers[slot].logprob for slot in sampled if self._samplers[slot].logprob}
        return sampled

    def clear(self) -> None:
        self._caches.clear()
        self._bound = None

    def copy_sequence(self, source: int, target: int) -> None:
        self._caches[target] = self._detached(self._cache(source))

    def _check(self, feed: Feed) -> None:
        if not feed.tokens:
            raise BackendError(f"slot {feed.slot}: a feed without tokens")
        if feed.sample and feed.slot not in self._samplers:
            raise BackendError(f"slot {feed.slot} was never started")
        length = self._cache(feed.slot).length
        if feed.pos != length:
            raise BackendError(f"slot {feed.slot}: position {feed.pos} does not continue its {length} tokens")

    def _prefill(self, feed: Feed, want) -> tuple:
        """One prompt chunk alone; the head of its last token (see _run)."""
        cache = self._cache(feed.slot)
        n, total = len(feed.tokens), cache.length + len(feed.tokens)
        if cache.length == 0 and self._in_place:
            into = self._arrays_with_room(1, n)
            head, _ = self._run([feed.tokens], np.ones((1, n), np.int64), [list(range(n))], into, want, into=into)
            self._caches[feed.slot] = _Cache(into, 0, 0, n)
            return _row(head, 0)
        past = self._detached(cache).values if cache.shared else cache.values
        head, present = self._run([feed.tokens], np.ones((1, total), np.int64),
                                  [list(range(feed.pos, feed.pos + n))], past, want)
        self._caches[feed.slot] = _Cache(present)
        return _row(head, 0)

    @property
    def _in_place(self) -> bool:
        """Whether GroupQueryAttention writes each step's keys and values into the past's own arrays (right-padded
        batches on the CPU): prompts then go into arrays with room for the steps after them."""
        return self._graph.right_padded and self._device == "cpu"

    def _arrays_with_room(self, rows: int, width: int) -> list[np.ndarray]:
        """Zeroed KV arrays for ``rows`` rows of up to ``width`` positions, and KV_HEADROOM more."""
        graph = self._graph
        shape = (rows, graph.kv_heads, width + KV_HEADROOM, graph.head_dim)
        return [np.zeros(shape, graph.kv_dtype) for _ in graph.past_names]

    def _prefill_together(self, feeds: list[Feed], wants: list) -> dict[int, tuple]:
        """Whole prompts of empty slots in one run (right-padded: GroupQueryAttention attends each row over its own
        length, from the mask); each slot's head (see _run), from its last token."""
        width = max(len(f.tokens) for f in feeds)
        ids = [f.tokens + [0] * (width - len(f.tokens)) for f in feeds]
        mask = _right_padded_mask([len(f.tokens) - 1 for f in feeds], width)
        into = self._arrays_with_room(len(feeds), width) if self._in_place else None
        past = into or [np.repeat(v, len(feeds), axis=0) for v in self._empty_cache().values]
        ends = [len(f.tokens) - 1 for f in feeds]
        if self._graph.picks_logits:
            want = None if all(w is None for w in wants) else any(wants)
            head, present = self._run(ids, mask, [list(range(width))] * len(feeds), past, want, last=ends, into=into)
            lasts = [_row(head, row) for row in range(len(feeds))]
        else:
            logits, present = self._run(ids, mask, [list(range(width))] * len(feeds), past, every_position=True,
                                        into=into)
            lasts = [(logits[row, end], int(logits[row, end].argmax())) for row, end in enumerate(ends)]
        heads = {}
        for row, (feed, want) in enumerate(zip(feeds, wants)):
            self._caches[feed.slot] = _Cache(present, row, 0, len(feed.tokens))
            last, best = lasts[row]
            heads[feed.slot] = (None, None) if want is None else ((last if want else None), best)
        return heads

    def _decode(self, feeds: list[Feed], wants: list) -> dict[int, tuple]:
        """One-token feeds (generating sequences) in one batched run; each slot's head (see _run)."""
        caches = {f.slot: self._cache(f.slot) for f in feeds}
        # Rows grouped by the arrays their caches live in, in their order there: the same sequences as the last
        # step are then that step's batch as it is.
        groups = {id(caches[f.slot].values): i for i, f in reversed(list(enumerate(feeds)))}
        feeds = sorted(feeds, key=lambda f: (groups[id(caches[f.slot].values)], caches[f.slot].row))
        lengths = [caches[f.slot].length for f in feeds]
        past, pads = self._batched_past([caches[f.slot] for f in feeds], set(caches))
        right = self._graph.right_padded
        mask = _right_padded_mask(lengths, max(lengths) + 1) if right else _left_padded_mask(pads, _shape(past[0])[2] + 1)
        want = None if all(w is None for w in wants) else any(wants)
        tokens, positions = [f.tokens for f in feeds], [[f.pos] for f in feeds]
        if self._in_place:  # GroupQueryAttention writes into the past's own buffers: no copy a step
            head, present = self._run_in_place(tokens, mask, positions, past, want), past
        else:
            head, present = self._run(tokens, mask, positions, past, want)
        for row, (feed, pad, length) in enumerate(zip(feeds, pads, lengths)):
            self._caches[feed.slot] = _Cache(present, row, 0, length + 1) if right else _Cache(present, row, pad)
        if self._bound is not None and self._bound.past is present:
            self._bound.caches = [self._caches[f.slot] for f in feeds]
        return {feed.slot: _row(head, row) for row, feed in enumerate(feeds)}

    def _decode_bound(self, feeds: list[Feed]) -> dict[int, int]:
        """The steady state of a greedy batch on the CPU: the sequences that decoded in place last step, each with
        room for one more token, decode again through the same binding; only their tokens and the mask change.
        The general path (step's) costs 0.2-0.3 ms more a step, 4% of a small model's step on this box."""
        bound = self._bound
        lengths = [c.size for c in bound.caches]
        for row, length in enumerate(lengths):  # each row's new token (a loop: fancy indexing costs 50 us here)
            bound.mask[row, length] = 1
        self._run_bound([f.tokens[0] for f in feeds], lengths)
        best = bound.best().tolist()
        for cache in bound.caches:
            cache.size += 1
        self.logprobs = {}
        return {feed.slot: self._samplers[feed.slot].sample(None, token) for feed, token in zip(feeds, best)}

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
                self._caches[slot] = self._detached(cache)
        if self._graph.right_padded:
            return _pack_right_padded(caches, self._graph.kv_dtype), [0] * len(caches)
        return self._pack(caches)

    def _pack(self, caches: list[_Cache]) -> tuple[list, list[int]]:
        """The caches (grouped by the arrays they live in) as one batch, each left-padded with zeros to the
        longest; and each one's padding. Every cache ends at its arrays' last position (a batch decodes in step),
        so one window of each group's arrays serves all of its rows."""
        width = max(c.length for c in caches)
        groups: dict[int, list[_Cache]] = {}
        for c in caches:
            groups.setdefault(id(c.values), []).append(c)
        parts = []
        for members in groups.values():
            values = members[0].values
            held = _shape(values[0])[2]
            parts.append(_Part(values, [c.row for c in members], max(0, held - width), held, max(0, width - held)))
        return self._helpers.pack(parts, width), [width - c.length for c in caches]

    def _detached(self, cache: _Cache, keep: int | None = None) -> _Cache:
        """Its first ``keep`` positions (all by default) copied into arrays of its own, on the same device."""
        end = cache.pad + (cache.length if keep is None else keep)
        return _Cache(self._helpers.pack([_Part(cache.values, [cache.row], cache.pad, end, 0)], end - cache.pad))

    def _run(self, input_ids: list[list[int]], mask: np.ndarray, positions: list[list[int]],
             past: list, want: bool | None = None, every_position: bool = False, last: list[int] | None = None,
             into: list[np.ndarray] | None = None) -> tuple:
        """One forward pass; its head and its present (left on the graph's device; with ``into``, host arrays bound
        as both past and present, GroupQueryAttention writing into them).

        The head: with ``want`` None nothing (a prompt chunk that samples nothing); else the argmax of each
        sequence's last position (``last``, by default the input's last; int64, a row per sequence) and, with
        ``want`` True, that position's logits (float32, a row per sequence; else None). With ``every_position``,
        every position's logits (float32, on the host) instead of a head."""
        graph, binding = self._graph, self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if graph.has_position_ids:
            binding.bind_cpu_input("position_ids", np.array(positions, dtype=np.int64))
        if graph.picks_logits:  # the LM head runs for the positions whose logits are read, not for every one
            width = len(input_ids[0])
            picked = (np.tile(np.arange(width), (len(input_ids), 1)) if every_position
                      else np.array(last if last is not None else [width - 1] * len(input_ids))[:, None])
            binding.bind_cpu_input(LOGIT_POSITIONS, picked.astype(np.int64)[..., None])
        binding.bind_output("logits", "cpu" if every_position else self._device)
        if into is None:
            for name, value in zip(graph.past_names, past):
                _bind_input(binding, name, value)
            for name in graph.present_names:
                binding.bind_output(name, self._device)  # the cache stays where the graph runs
        else:
            _bind_in_place(binding, graph, into)
        try:
            self.session.run_with_iobinding(binding)
        except ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed a step of {len(input_ids)} sequences: {exc}") from exc
        outputs = binding.get_outputs()
        present = outputs[1:] if into is None else into
        if every_position:
            return np.array(outputs[0].numpy(), dtype=np.float32), present  # a copy: the binding owns its memory
        head = None if want is None else self._helpers.head(outputs[0], want)
        return head, present

    def _all_logits(self, tokens: list[int]) -> np.ndarray:
        """Every position's logits (float32) of ``tokens`` from an empty past of their own."""
        logits, _present = self._run([tokens], np.ones((1, len(tokens)), np.int64), [list(range(len(tokens)))],
                                     self._empty_cache().values, every_position=True)
        return logits[0]

    def _run_in_place(self, input_ids: list[list[int]], mask: np.ndarray, positions: list[list[int]],
                      past: list[np.ndarray], want: bool | None) -> tuple | None:
        """One decode step of a right-padded batch on the CPU whose new keys and values GroupQueryAttention writes
        into the past arrays themselves (past and present bound to the same memory); its head (see _run)."""
        if self._bound is None or self._bound.past is not past:
            self._bound = _Bound(self.session, self._graph, past)
        bound = self._bound
        bound.mask[:, : mask.shape[1]] = mask
        bound.mask[:, mask.shape[1]:] = 0
        self._run_bound([tokens[0] for tokens in input_ids], [p[0] for p in positions])
        if want is None:
            return None
        return (bound.logits[:, -1].astype(np.float32) if want else None), bound.best()

    def _run_bound(self, tokens: list[int], positions: list[int]) -> None:
        """One decode step of the bound batch: each row's token at its position, after those its mask holds."""
        bound = self._bound
        bound.ids[:, 0] = tokens
        if bound.position_ids is not None:
            bound.position_ids[:, 0] = positions
        try:
            self.session.run_with_iobinding(bound.binding)
        except ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed a step of {len(tokens)} sequences: {exc}") from exc

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
        return self._all_logits(tokens)


class _GraphSignature:
    """What the decoder graph takes and gives: names, KV cache shape and dtype."""

    def __init__(self, session: ort.InferenceSession, builder: BuilderModel | None = None):
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        self.picks_logits = LOGIT_POSITIONS in inputs  # see ort_graphs.picking_logits
        self.argmaxes = any(o.name == LOGITS_ARGMAX for o in session.get_outputs())  # the same
        first = inputs[self.past_names[0]]
        _, self.kv_heads, _, self.head_dim = first.shape
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        # GroupQueryAttention takes each row's length from the mask and its positions from that length.
        self.right_padded = builder is not None
        self.batches_decodes = self.has_position_ids or self.right_padded
        if builder is not None:
            check_graph_inputs({n: i.type for n, i in inputs.items() if n != LOGIT_POSITIONS})  # that one is ours
            self.kv_heads, self.head_dim = builder.kv_heads, builder.head_size  # the graph leaves head_dim symbolic
            self.vocab = builder.vocab_size


class _Bound:
    """A right-padded batch decoding in place on the CPU, bound once while the same batch decodes (binding arrays
    anew each step, or wrapping every output with get_outputs, costs 1-2 ms of a 15 ms step):

    - its KV arrays as both past and present;
    - arrays for its tokens, position ids (where the graph takes them), logits and their argmax (where the graph
      gives it, see ort_graphs.picking_logits);
    - its attention mask, over the arrays' whole width. GroupQueryAttention reads each row's length from the mask's
      sum; the mask's width (total_sequence_length) is used "for checking inputs and determining prompt vs token
      generation", its documentation says, and onnxruntime-genai's CUDA-graph decoding binds a mask of its whole
      max_length the same way. Binding the positions in use anew each step cost 30-50 us on this box;
    - and its slots' caches, row by row."""

    def __init__(self, session: ort.InferenceSession, graph: _GraphSignature, past: list[np.ndarray]):
        rows, width = _shape(past[0])[0], _shape(past[0])[2]
        self.past, self.caches = past, []
        self.ids = np.zeros((rows, 1), np.int64)
        self.mask = np.zeros((rows, width), np.int64)
        self.position_ids = np.zeros((rows, 1), np.int64) if graph.has_position_ids else None
        self.logit_positions = np.zeros((rows, 1, 1), np.int64) if graph.picks_logits else None  # a step's one
        self.logits = np.empty((rows, 1, graph.vocab), graph.logits_dtype)
        self.argmax = np.zeros((rows, 1), np.int64) if graph.argmaxes else None
        # Every array bound here is held here: an OrtValue made from numpy does not keep the array alive.
        self.binding = session.io_binding()
        inputs = {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.position_ids,
                  LOGIT_POSITIONS: self.logit_positions}
        for name, array in inputs.items():
            if array is not None:
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, array in {"logits": self.logits, LOGITS_ARGMAX: self.argmax}.items():
            if array is not None:
                self.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        _bind_in_place(self.binding, graph, past)

    def best(self) -> np.ndarray:
        """Each row's argmax of its last step's logits."""
        return self.argmax[:, 0] if self.argmax is not None else self.logits[:, -1].argmax(-1)

    def continues(self, feeds: list[Feed], caches: dict[int, _Cache], samplers: dict[int, SlotSampler]) -> bool:
        """Whether ``feeds`` are this batch's next greedy tokens, row by row, each with room left in the arrays."""
        if len(feeds) != len(self.caches):
            return False
        width = _shape(self.past[0])[2]
        for feed, cache in zip(feeds, self.caches):
            if (caches.get(feed.slot) is not cache or len(feed.tokens) != 1 or feed.pos != cache.size
                    or cache.size >= width or not feed.sample or feed.also or not samplers[feed.slot].greedy):
                return False
        return True


class _ProviderDeclined(Exception):
    """onnxruntime started a session on other execution providers than the one asked for."""


@dataclass
class _Part:
    """Rows ``rows`` of a batch's arrays, positions start..end, left-padded by ``pad_left`` zero positions."""

    values: list
    rows: list[int]
    start: int
    end: int
    pad_left: int


def _helpers_for(graph: _GraphSignature, device: str, threads: int):
    """What the step loop does to the KV cache and the logits, where they are: small ONNX graphs on the GPU, numpy
    on the host (measured 0.90x and 0.89x at 8 and 32 sequences with the graphs on the CPU: more passes over the
    cache than numpy's one copy; bench/results/onnx_cpu_path)."""
    return _GraphHelpers(graph, "cuda", threads) if device != "cpu" else _HostHelpers()


class _HostHelpers:
    """The KV cache and the logits on the host: numpy over the OrtValues' memory."""

    def pack(self, parts: list[_Part], width: int) -> list[np.ndarray]:
        """The parts' rows stacked, each left-padded with zeros to ``width``, array by array."""
        hosts = [[_host(v) for v in part.values] for part in parts]
        _, kv_heads, _, head_dim = hosts[0][0].shape
        n = sum(len(part.rows) for part in parts)
        out = []
        for layer in range(len(hosts[0])):
            # Zeros, not garbage: masked positions still go through the attention's matmul.
            batch = np.zeros((n, kv_heads, width, head_dim), dtype=hosts[0][layer].dtype)
            target = 0
            for part, arrays in zip(parts, hosts):
                for row in part.rows:
                    batch[target, :, part.pad_left:] = arrays[layer][row, :, part.start:part.end]
                    target += 1
            out.append(batch)
        return out

    def head(self, logits, want_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        last = logits.numpy()[:, -1].astype(np.float32)
        return (last if want_logits else None), last.argmax(-1)


class _GraphHelpers:
    """The small graphs of ``ort_graphs`` as sessions on the model's execution provider: the KV cache and the
    logits stay on the GPU, and only the chosen tokens (and logits a sampler needs) cross to the host."""

    def __init__(self, graph: _GraphSignature, device: str, threads: int):
        self.device, self.threads = device, threads
        self.n_arrays, self.kv_dtype = len(graph.past_names), graph.kv_dtype
        self._window = self._session(window_graph(self.n_arrays, self.kv_dtype))
        self._head = self._session(head_graph(graph.logits_dtype))
        self._concats: dict[int, ort.InferenceSession] = {}

    def _session(self, model: bytes) -> ort.InferenceSession:
        options = _base_options(self.threads)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        return ort.InferenceSession(model, sess_options=options, providers=providers)

    def _run(self, session: ort.InferenceSession, inputs: dict, outputs: dict[str, str]) -> list:
        binding = session.io_binding()
        for name, value in inputs.items():
            _bind_input(binding, name, value)
        for name, device in outputs.items():
            binding.bind_output(name, device)
        try:
            session.run_with_iobinding(binding)
        except ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed to re-pack the KV cache: {exc}") from exc
        return binding.get_outputs()

    def pack(self, parts: list[_Part], width: int) -> list:
        """The parts' rows stacked, each left-padded with zeros to ``width``: a window graph run per part, then
        a concat graph run where there are several."""
        windows = [self.window(p.values, p.rows, p.start, p.end, p.pad_left) for p in parts]
        return windows[0] if len(windows) == 1 else self.concat(windows)

    def window(self, values: list, rows: list[int], start: int, end: int, pad_left: int) -> list:
        """Rows ``rows`` of each array, positions start..end, left-padded by ``pad_left`` zero positions."""
        inputs = {f"x{i}": v for i, v in enumerate(values)} | {
            "rows": np.array(rows, np.int64), "start": np.array([start], np.int64), "end": np.array([end], np.int64),
            "pads": np.array([0, 0, pad_left, 0, 0, 0, 0, 0], np.int64)}
        return self._run(self._window, inputs, {f"y{i}": self.device for i in range(self.n_arrays)})

    def concat(self, parts: list[list]) -> list:
        """Several batches' arrays (of one width) stacked along the rows, array by array."""
        if len(parts) not in self._concats:
            self._concats[len(parts)] = self._session(concat_graph(self.n_arrays, len(parts), self.kv_dtype))
        inputs = {f"p{j}_{i}": v for j, part in enumerate(parts) for i, v in enumerate(part)}
        return self._run(self._concats[len(parts)], inputs, {f"y{i}": self.device for i in range(self.n_arrays)})

    def head(self, logits, want_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """The argmax of each row's last position, and with ``want_logits`` those logits, on the host."""
        last, best = self._run(self._head, {"logits": logits},
                               {"last": "cpu" if want_logits else self.device, "best": "cpu"})
        return (last.numpy() if want_logits else None), best.numpy()


def _host(value) -> np.ndarray:
    """A numpy view of an array the host holds (an OrtValue on the CPU, or numpy)."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def _bind_in_place(binding: ort.IOBinding, graph: _GraphSignature, arrays: list[np.ndarray]) -> None:
    """Host arrays bound as both the past and the present of each layer: GroupQueryAttention writes a step's keys
    and values into them."""
    for past_name, present_name, array in zip(graph.past_names, graph.present_names, arrays):
        value = ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: the array's memory, not a copy
        binding.bind_ortvalue_input(past_name, value)
        binding.bind_ortvalue_output(present_name, value)


def _bind_input(binding, name: str, value) -> None:
    if isinstance(value, np.ndarray):
        binding.bind_cpu_input(name, value)
    else:
        binding.bind_ortvalue_input(name, value)


def _row(head: tuple | None, row: int) -> tuple:
    """One sequence's (logits or None, argmax) of a head."""
    if head is None:
        return None, None
    last, best = head
    return (None if last is None else last[row]), int(best[row])


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


def _pack_right_padded(caches: list[_Cache], dtype) -> list[np.ndarray]:
    """The caches as one batch on the host, each right-padded with zeros to the longest plus KV_HEADROOM free
    positions (GroupQueryAttention writes each step's keys and values into them in place)."""
    width = max(c.length for c in caches) + KV_HEADROOM
    hosts: dict[int, list[np.ndarray]] = {}  # each distinct set of arrays brought to the host once
    for c in caches:
        if id(c.values) not in hosts:
            hosts[id(c.values)] = [_host(v) for v in c.values]
    _, kv_heads, _, head_dim = _shape(caches[0].values[0])
    past = []
    for layer in range(len(caches[0].values)):
        batch = np.zeros((len(caches), kv_heads, width, head_dim), dtype=dtype)
        for row, c in enumerate(caches):
            batch[row, :, : c.length] = hosts[id(c.values)][layer][c.row, :, c.pad : c.pad + c.length]
        past.append(batch)
    return past


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


class SlotSampler:
    """One sequence's sampling: its settings, its seeded draws and the tokens it generated (for the penalties)."""

    def __init__(self, params: SamplingParams, context_length: int):
        self.params = params
        self.rng = np.random.default_rng(params.seed)  # no seed: numpy draws a fresh one from the OS
        self.last_n = context_length if params.repeat_last_n < 0 else params.repeat_last_n
        self.generated: list[int] = []
        self.logprob: TokenLogprob | None = None  # of the last sampled token, when the params ask
        self.greedy = not self.needs_logits()  # the argmax is the token

    def needs_logits(self, mask: np.ndarray | None = None) -> bool:
        """Whether the next token needs the logits, not only their argmax."""
        params = self.params
        return (params.temperature > 0 or mask is not None or bool(params.logit_bias) or params.penalizes
                or params.logprobs is not None)

    def sample(self, logits: np.ndarray | None, best: int | None = None, mask: np.ndarray | None = None) -> int:
        """The next token, from the logits; or, where needs_logits said no and they did not cross, the argmax."""
        if logits is None:
            self.generated.append(best)
            self.logprob = None
            return best
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


def _base_options(threads: int) -> ort.SessionOptions:
    """What every session of a model shares: its threads, and no memory plan, since shapes change every step
    (the KV cache grows), so a planned memory pattern never gets reused."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


def _optimized_graph_path(folder: Path, graph_sha256: str, provider: str) -> Path:
    # "picking-argmax": made by a backend that changes the graph with ort_graphs.picking_logits where it applies
    # (older caches lack its input or its output); a change to picking_logits needs a new tag.
    picking = ".picking-argmax" if provider in PICKING_PROVIDERS else ""
    return folder / CACHE_DIR / f"{GRAPH[:-5]}.{provider}.ort{ort.__version__}.{graph_sha256[:12]}{picking}.onnx"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)
