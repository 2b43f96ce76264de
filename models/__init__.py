"""The model catalog: which models this box knows and where their files come from."""

from models.catalog import ModelEntry, ModelNotFound, find_model, list_models, sha256_file, verify_model

__all__ = ["ModelEntry", "ModelNotFound", "find_model", "list_models", "sha256_file", "verify_model"]
