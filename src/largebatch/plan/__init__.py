"""Scaling planner: all-reduce cost models, a compute model, calibration, predictions.

Depends on numpy, pyyaml and (for benchmarks and plots only, imported lazily) torch and
matplotlib; never on the trainer or the command line. See docs/planner.md.
"""

from largebatch.plan.costs import ALGORITHMS, CostTerms, Network, allreduce_time, best_algorithm
from largebatch.plan.errors import PlanError
from largebatch.plan.hardware import Hardware, list_hardware, load_hardware
from largebatch.plan.model import PAPER_PROFILES, Profile, resolve_profile
from largebatch.plan.predict import iterations, predict, predict_iteration

__all__ = [
    "ALGORITHMS",
    "PAPER_PROFILES",
    "CostTerms",
    "Hardware",
    "Network",
    "PlanError",
    "Profile",
    "allreduce_time",
    "best_algorithm",
    "iterations",
    "list_hardware",
    "load_hardware",
    "predict",
    "predict_iteration",
    "resolve_profile",
]
