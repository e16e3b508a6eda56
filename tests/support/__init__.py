"""Helpers shared by the test modules, one module per concern; no test module imports another.

runs: tiny training configs, the command line in-process, and subprocess/torchrun launchers.
checkpoints: reading a run's checkpoints and metrics back, and a pickle that must never run.
images: small image folders on disk and the readers the data tests share.
optim: a check that fails on host syncs, the shared LARS option sets, and a multi-step float64
LARS driver over tests/reference.py (the references themselves stay in reference.py).
"""
