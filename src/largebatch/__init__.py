"""largebatch: train image classifiers with very large mini-batches (LARS, warm-up, poly decay)."""

__version__ = "0.1.0"
