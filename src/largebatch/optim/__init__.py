"""Layer-wise adaptive optimizers for large batches. Depends on torch alone."""

from largebatch.optim.groups import is_bias_or_norm, param_groups
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS, lars_trust_ratio

__all__ = ["LAMB", "LARS", "is_bias_or_norm", "lars_trust_ratio", "param_groups"]
