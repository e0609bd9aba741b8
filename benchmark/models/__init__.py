"""Model handles and loaders for SD-style text-to-image models."""

from benchmark.models.handle import COMPONENTS, ModelHandle, TokenizedPrompts, state_dict_sha256
from benchmark.models.loading import ModelLoadError, load_model

__all__ = ["COMPONENTS", "ModelHandle", "ModelLoadError", "TokenizedPrompts", "load_model", "state_dict_sha256"]
