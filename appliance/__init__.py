"""Offline edge inference appliance: a local OpenAI-compatible service over llama.cpp and ONNX Runtime."""

__version__ = "0.1.0"
