"""Engines by model format: a "module:Class" name is imported only when a model of that format is used, so a
box with only llama.cpp installed never imports onnxruntime, and the HTTP process never imports an engine."""

from __future__ import annotations

import importlib

from appliance.backends.base import BackendError

EXTRAS = {"gguf": "llama", "onnx": "onnx"}  # the pip extra that installs each format's engine


def resolve(registry: dict, model_format: str, what: str = "models") -> type:
    """The class registered for ``model_format`` (imported on first use); ``what`` names the models in errors."""
    try:
        target = registry[model_format]
    except KeyError:
        raise BackendError(f"no backend serves {what} of format {model_format!r}") from None
    if isinstance(target, str):
        module_name, class_name = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendError(
                f"the backend for {model_format!r} {what} is not installed ({exc.name} missing): "
                f"pip install 'edge-appliance[{EXTRAS.get(model_format, model_format)}]'"
            ) from exc
        target = registry[model_format] = getattr(module, class_name)
    return target
