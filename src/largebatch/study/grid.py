"""The sweep spec: a grid of (optimizer, global batch) cells, learning-rate candidates, seeds.

A spec is a YAML mapping:

    base:              # any trainer config keys (nested or dotted), shared by every trial
      model: {name: fmnist_net, options: {width: 16}}
      epochs: 40
    batch_sizes: [256, 1024, 4096]
    max_micro_batch: 128     # larger batches accumulate micro-batches of (at most) this size
    seeds: [0, 1]
    extend_search: 1         # a best rate at the edge of the candidates tries one more beyond it
    optimizers:
      lars: {lrs: [5, 10, 20]}
      sgd:                   # the label; `name` defaults to it
        lrs: [0.05, 0.1, 0.2]
        set: {schedule.scaling: linear}

``lrs`` is either one list for every batch or a mapping batch -> list (the paper tuned the rate
per batch size). ``extend_search`` (default 0) lets the search step past the candidates: while
the best rate is the smallest or largest one tried, one more rate beyond it runs (the outermost
ratio of the candidates, so x2 for a list doubling), at most that many times per cell. The
sweep itself sets batch_size, micro_batch, seed, optim.name, optim.lr and out, so those keys are
refused in ``base`` and ``set``. Every trial's config is built and
validated when the spec is loaded, so a typo stops the sweep before anything has run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largebatch.config import (
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
    flatten_keys,
    load_config,
    read_yaml_mapping,
    split_assignment,
    unknown_key_message,
)
from largebatch.models import ModelError, check_options

__all__ = [
    "SET_BY_SWEEP",
    "SPEC_KEYS",
    "OptimizerSpec",
    "SweepSpec",
    "Trial",
    "apply_overrides",
    "build_spec",
    "format_lr",
    "load_spec",
    "parse_spec_override",
    "rate_beyond_edge",
]

SPEC_KEYS = ("base", "batch_sizes", "max_micro_batch", "seeds", "extend_search", "optimizers")
OPTIMIZER_KEYS = ("name", "lrs", "set")
# what each trial gets from the sweep, with the spec key that controls it
SET_BY_SWEEP = {
    "batch_size": "batch_sizes", "micro_batch": "max_micro_batch", "seed": "seeds",
    "optim.name": "optimizers.<label>.name", "optim.lr": "optimizers.<label>.lrs", "out": "--out",
}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class OptimizerSpec:
    """One line of the plot: an optimizer with its settings and learning-rate candidates."""

    label: str
    name: str
    lrs: dict[int, tuple[float, ...]]  # global batch -> candidates, in the spec's order
    settings: dict[str, Any] = field(default_factory=dict)  # dotted trainer keys


@dataclass(frozen=True)
class Trial:
    """One trainer run: a cell (optimizer label, batch), a candidate learning rate and a seed."""

    label: str
    batch: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.label}_b{self.batch}_lr{format_lr(self.lr)}_s{self.seed}"


@dataclass
class SweepSpec:
    base: dict[str, Any]  # dotted trainer keys
    batch_sizes: list[int]
    optimizers: list[OptimizerSpec]
    seeds: list[int]
    max_micro_batch: int | None = None
    extend_search: int = 0  # extra rates a cell may try beyond the edge of its candidates

    def optimizer(self, label: str) -> OptimizerSpec:
        return next(o for o in self.optimizers if o.label == label)

    def micro_batch(self, batch: int) -> int:
        """The batch itself when it fits, else the largest divisor of it up to max_micro_batch
        (max_micro_batch itself for the usual powers of two)."""
        limit = self.max_micro_batch
        if limit is None or batch <= limit:
            return batch
        return next(m for m in range(limit, 0, -1) if batch % m == 0)

    def trials_per_cell(self, label: str, batch: int) -> int:
        """Candidates on the first seed, then one run for each further seed at the best rate
        (plus up to ``extend_search`` rates beyond the edge, not counted here)."""
        return len(self.optimizer(label).lrs[batch]) + len(self.seeds) - 1

    def total_trials(self) -> int:
        return sum(self.trials_per_cell(o.label, b) for o in self.optimizers for b in self.batch_sizes)

    def trial_config(self, trial: Trial, run_dir: str | Path) -> TrainConfig:
        opt = self.optimizer(trial.label)
        # copies: load_config writes dotted keys such as model.options.width into option mappings
        pairs = copy.deepcopy([("progress", False), *self.base.items(), *opt.settings.items()])
        pairs += [
            ("optim.name", opt.name), ("optim.lr", trial.lr), ("batch_size", trial.batch),
            ("micro_batch", self.micro_batch(trial.batch)), ("seed", trial.seed), ("out", str(run_dir)),
        ]
        try:
            config = load_config(None, pairs)
            check_options(config.model.name, config.model.options)
        except (ConfigError, ModelError) as err:
            raise ConfigError(f"sweep spec, trial {trial.name}: {err}") from None
        return config


def format_lr(lr: float) -> str:
    return format(lr, ".6g")


def rate_beyond_edge(tried: list[float], best: float) -> float | None:
    """The next rate past the edge when ``best`` is the smallest or largest of ``tried``: the
    outermost ratio of the tried rates applied once more (4 significant digits). None when the
    best lies inside, or when there is only one rate (no ratio to follow)."""
    ordered = sorted(tried)
    if len(ordered) < 2:
        return None
    if best == ordered[-1]:
        nxt = best * ordered[-1] / ordered[-2]
    elif best == ordered[0]:
        nxt = best * ordered[0] / ordered[1]
    else:
        return None
    return float(f"{nxt:.4g}")


def _trainer_keys(where: str, tree: Any) -> dict[str, Any]:
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"sweep spec: {where} must be a mapping of trainer config keys, got {tree!r}")
    flat = flatten_keys(tree)
    for key in flat:
        if key in SET_BY_SWEEP:
            raise ConfigError(f"sweep spec: {where}.{key} is set by the sweep (from {SET_BY_SWEEP[key]}); remove it")
    return flat


def _int_list(key: str, value: Any, allow_zero: bool = False) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"sweep spec: {key} must be a non-empty list of integers, got {value!r}")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or item < (0 if allow_zero else 1):
            low = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"sweep spec: {key} must hold integers {low}, got {item!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"sweep spec: {key} has repeated values: {value!r}")
    return list(value)


def _lr_list(key: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"sweep spec: {key} must be a non-empty list of learning rates, got {value!r}")
    lrs = []
    for item in value:
        number = item
        if isinstance(item, str):  # PyYAML reads 1e-3 (no dot, no sign) as a string
            with contextlib.suppress(ValueError):
                number = float(item)
        if not isinstance(number, (int, float)) or isinstance(number, bool) or not 0 < number < math.inf:
            raise ConfigError(f"sweep spec: {key} must hold finite numbers > 0, got {item!r}")
        lrs.append(float(number))
    names = [format_lr(v) for v in lrs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep spec: {key} has repeated values: {value!r}")
    return tuple(lrs)


def _optimizer(label: Any, entry: Any, batches: list[int]) -> OptimizerSpec:
    where = f"optimizers.{label}"
    if not isinstance(label, str) or not _LABEL.match(label):
        raise ConfigError(f"sweep spec: optimizer label {label!r} must be letters, digits, '_' or '-'")
    if not isinstance(entry, dict):
        raise ConfigError(f"sweep spec: {where} must be a mapping with lrs (and optionally name, set), got {entry!r}")
    for key in entry:
        if key not in OPTIMIZER_KEYS:
            allowed = [f"{where}.{k}" for k in OPTIMIZER_KEYS]
            raise ConfigError(f"sweep spec: {unknown_key_message(f'{where}.{key}', allowed)}")
    name = entry.get("name", label)
    if name not in OPTIMIZERS:
        raise ConfigError(f"sweep spec: {where}.name must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    if "lrs" not in entry:
        raise ConfigError(f"sweep spec: {where}.lrs is missing (the learning-rate candidates)")
    raw = entry["lrs"]
    if isinstance(raw, dict):
        extra = sorted(set(raw) - set(batches), key=str)
        if extra:
            raise ConfigError(f"sweep spec: {where}.lrs has batch {extra[0]!r}, which is not in batch_sizes {batches}")
        missing = [b for b in batches if b not in raw]
        if missing:
            raise ConfigError(f"sweep spec: {where}.lrs gives no candidates for batch {missing[0]}")
        lrs = {b: _lr_list(f"{where}.lrs.{b}", raw[b]) for b in batches}
    else:
        candidates = _lr_list(f"{where}.lrs", raw)
        lrs = {b: candidates for b in batches}
    return OptimizerSpec(label, name, lrs, _trainer_keys(f"{where}.set", entry.get("set")))


def build_spec(tree: Any) -> SweepSpec:
    """Validate a spec tree (as read from YAML) and every trial config it implies."""
    if not isinstance(tree, dict):
        raise ConfigError(f"sweep spec must be a mapping with keys {', '.join(SPEC_KEYS)}, got {type(tree).__name__}")
    for key in tree:
        if key not in SPEC_KEYS:
            raise ConfigError(f"sweep spec: {unknown_key_message(str(key), list(SPEC_KEYS))}")
    for key in ("batch_sizes", "seeds", "optimizers"):
        if key not in tree:
            raise ConfigError(f"sweep spec: {key} is missing")
    batches = _int_list("batch_sizes", tree["batch_sizes"])
    seeds = _int_list("seeds", tree["seeds"], allow_zero=True)
    limit = tree.get("max_micro_batch")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"sweep spec: max_micro_batch must be a positive integer or null, got {limit!r}")
    extend = tree.get("extend_search", 0)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        raise ConfigError(f"sweep spec: extend_search must be an integer >= 0 (extra rates per cell), got {extend!r}")
    entries = tree["optimizers"]
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"sweep spec: optimizers must be a non-empty mapping label -> {{lrs, set}}, got {entries!r}")
    optimizers = [_optimizer(label, entry, batches) for label, entry in entries.items()]
    spec = SweepSpec(_trainer_keys("base", tree.get("base")), batches, optimizers, seeds, limit, extend)
    for opt in optimizers:  # every trial config, before anything runs
        for batch in batches:
            for lr in opt.lrs[batch]:
                spec.trial_config(Trial(opt.label, batch, lr, seeds[0]), "unused")
    return spec


def parse_spec_override(text: str) -> tuple[str, Any]:
    """``key=value`` (value read as YAML). Spec keys (batch_sizes, seeds, optimizers.sgd.lrs, ...)
    address the spec; any other key is a trainer key and goes under ``base``."""
    key, value = split_assignment(text)
    if key.split(".")[0] not in SPEC_KEYS:
        key = f"base.{key}"
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``tree`` with the overrides set (dotted keys; numeric parts are batch sizes)."""
    tree = copy.deepcopy(tree)
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if head == "base" and rest:  # trainer keys stay dotted under base: flatten_keys keeps them
            base = tree.get("base") or {}
            if not isinstance(base, dict):
                raise ConfigError(f"--set {key}: base is not a mapping in the spec")
            base[rest] = value
            tree["base"] = base
            continue
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a mapping in the spec")
            node = child
        node[parts[-1]] = value
    return tree


def load_spec(path: str | Path, overrides: list[tuple[str, Any]] | None = None) -> SweepSpec:
    """Read a spec file, apply ``--set`` overrides, validate.

    ``--set batch_sizes=[...]`` may pick a subset of the file's batches: per-batch ``lrs``
    entries of the batches it leaves out are dropped (in the file itself they are an error).
    """
    tree = read_yaml_mapping(path, "sweep spec")
    overrides = overrides or []
    new = apply_overrides(tree, overrides)
    if any(key == "batch_sizes" for key, _ in overrides):
        _drop_unused_batch_rates(new, tree.get("batch_sizes"))
    return build_spec(new)


def _drop_unused_batch_rates(tree: dict[str, Any], listed: Any) -> None:
    """Drop per-batch candidates of batches the file ``listed`` that the overridden batch_sizes left out."""
    kept = tree.get("batch_sizes")
    if not isinstance(kept, list) or not isinstance(listed, list) or not isinstance(tree.get("optimizers"), dict):
        return  # build_spec reports the malformed part
    for entry in tree["optimizers"].values():
        rates = entry.get("lrs") if isinstance(entry, dict) else None
        if isinstance(rates, dict):
            entry["lrs"] = {b: v for b, v in rates.items() if b in kept or b not in listed}
