"""Layer-wise adaptive optimizers for large batches. Depends on torch alone."""

from largebatch.optim.groups import is_bias_or_norm, param_groups
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS, lars_trust_ratio
from largebatch.optim.variants import VARIANTS, Variant, variant

__all__ = ["LAMB", "LARS", "VARIANTS", "Variant", "is_bias_or_norm", "lars_trust_ratio", "param_groups", "variant"]
