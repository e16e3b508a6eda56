"""Image classifiers by name, and their parameter and MAC counts. Depends on torch/torchvision."""

from largebatch.models.profile import ModelProfile, count_params, profile_model
from largebatch.models.registry import (
    MODEL_NAMES,
    OPTION_RULES,
    ModelError,
    build_model,
    check_input,
    check_options,
    default_input_size,
    model_options,
)

__all__ = [
    "MODEL_NAMES",
    "OPTION_RULES",
    "ModelError",
    "ModelProfile",
    "build_model",
    "check_input",
    "check_options",
    "count_params",
    "default_input_size",
    "model_options",
    "profile_model",
]
