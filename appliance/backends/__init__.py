"""Inference engines behind one interface, registered by name.

Built-in backends register through the same ``register`` call a plugin would.
Only the runner process (``appliance.runner.worker``) creates a backend: the
HTTP process never imports an engine. Ask ``create_backend(model_format, ...)``.
"""

from __future__ import annotations

from appliance.backends.base import Backend, BackendError, Feed, ModelFacts, SamplingParams, Usage
from appliance.backends.registry import resolve

# model format -> "module:Class", imported only when a model of that format is used,
# so a box with only llama.cpp installed never imports onnxruntime and vice versa.
_REGISTRY: dict[str, str | type[Backend]] = {
    "gguf": "appliance.backends.llama_cpp:LlamaCppBackend",
    "onnx": "appliance.backends.onnx_runtime:OnnxRuntimeBackend",
}


def register(model_format: str, backend: str | type[Backend]) -> None:
    _REGISTRY[model_format] = backend


def backend_class(model_format: str) -> type[Backend]:
    return resolve(_REGISTRY, model_format)


def create_backend(
    model_format: str, model_path, threads: int, context_length: int, n_slots: int = 1, provider: str = "auto",
    engine: dict | None = None,
) -> Backend:
    cls = backend_class(model_format)
    # Settings only some engines have (the execution provider, llama.cpp's GPU and KV cache settings) go to those
    # that list them in ``options``.
    extra = {k: v for k, v in ({"provider": provider} | (engine or {})).items() if k in cls.options}
    return cls(model_path, threads=threads, context_length=context_length, n_slots=n_slots, **extra)


__all__ = ["Backend", "BackendError", "Feed", "ModelFacts", "SamplingParams", "Usage", "create_backend", "register",
           "backend_class"]
