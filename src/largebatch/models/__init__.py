"""Image classifiers by name, and their parameter and MAC counts. Depends on torch/torchvision."""

from largebatch.models.profile import ModelProfile, count_params, profile_model
from largebatch.models.registry import MODEL_NAMES, build_model, default_input_size, model_options

__all__ = [
    "MODEL_NAMES",
    "ModelProfile",
    "build_model",
    "count_params",
    "default_input_size",
    "model_options",
    "profile_model",
]
