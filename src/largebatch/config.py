"""One dataclass tree for a training run: YAML file + dotted command-line overrides, validated.

Every mistake a user can make here raises ``ConfigError`` with one line that names the key, the
value and what is allowed. The rules about keys live here too: which keys a resumed run may
change, how nested sections flatten to dotted keys, and how the global batch splits into
micro-batches for a world size.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from largebatch.errors import UserError, first_line, on_every_rank
from largebatch.optimizer_table import COMMON_KEYS, OPTIMIZER_TABLE
from largebatch.schedule import DECAYS, ORIGINS, backwards_reason, linear_scaling, sqrt_scaling
from largebatch.yaml_numbers import load_yaml

__all__ = [
    "DECAYS",
    "DEVICES",
    "GRAD_DTYPES",
    "OPTIMIZERS",
    "PRECISIONS",
    "RESUMABLE_CHANGES",
    "SCALING_RULES",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "all_keys",
    "batch_plan",
    "config_differences",
    "derive_accumulation",
    "describe_keys",
    "dump_yaml",
    "flatten_keys",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml_mapping",
    "set_dotted",
    "split_assignment",
    "to_dict",
    "unknown_key_message",
    "validate",
]

OPTIMIZERS = tuple(OPTIMIZER_TABLE)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
CUDA_GRAPHS = ("auto", "on", "off")
SCALING_RULES = ("none", "linear", "sqrt")
GRAD_DTYPES = ("fp32", "bf16", "fp16")
SEED_LIMIT = 2**32  # numpy's and the data order's generators take seeds below this

# Keys that may differ between a run and its resumption (presentation, cadence, placement).
RESUMABLE_CHANGES = {
    "progress", "log_every", "threads", "out", "eval_every", "checkpoint_every", "keep_checkpoints",
    "device", "micro_batch", "data.root", "data.eval_batch", "model.compile", "optim.fused", "optim.implementation",
    "dist_timeout_s", "cuda_graphs",
}


class ConfigError(UserError, ValueError):
    """A configuration the user can fix; the message is one line."""


# how an options mapping combines with the config file's (load_config implements it)
OPTIONS_RULE = ("--set KEY={...} replaces the whole mapping; --set KEY.NAME=V changes one entry and keeps the "
                "others (applied after any whole mapping)")


def described(default: Any, about: str) -> Any:
    """A config field with its one-line description (shown by ``largebatch train --keys``)."""
    return field(default=default, metadata={"about": about})


@dataclass
class ModelConfig:
    name: str = described("resnet_small", "registry name (docs/models_and_data.md)")
    options: dict = field(default_factory=dict, metadata={
        "about": "constructor options, e.g. {width: 16}; in_channels and image_size default to the data's. "
                 + OPTIONS_RULE})
    channels_last: bool = described(True, "channels_last memory format for 4-d inputs")
    compile: bool = described(False, "run the model through torch.compile")


@dataclass
class DataConfig:
    name: str = described("fashion_mnist", "dataset: fashion_mnist, imagefolder or synthetic")
    root: str | None = described(None, "dataset directory (fashion_mnist: the system's copy by default)")
    augment: bool = described(True, "training augmentation (random crop and flip)")
    eval_batch: int = described(2000, "evaluation batch per process")
    options: dict = field(default_factory=dict, metadata={
        "about": "dataset options, e.g. imagefolder's {workers: 8, image_size: 227}. " + OPTIONS_RULE})


@dataclass
class OptimConfig:
    name: str = described("lars", "lars, lamb or sgd (momentum; the linear-scaling baseline)")
    lr: float | None = described(None, "peak learning rate after warm-up (before a scaling rule, if any); "
                                 "default per optimizer: " + ", ".join(
                                     f"{n} {s.default_lr:g}" for n, s in OPTIMIZER_TABLE.items()))
    momentum: float = described(0.9, "momentum in [0, 1) (lars, sgd)")
    weight_decay: float = described(5e-4, "L2 weight decay (lars, sgd: in the gradient; lamb: decoupled)")
    trust_coefficient: float = described(0.001, "LARS eta in eta * ||w|| / (||g|| + wd * ||w|| + eps)")
    eps: float | None = described(None, "lars: epsilon in the trust ratio's denominator (default 0); "
                                  "lamb: Adam's epsilon (default 1e-6, > 0)")
    nesterov: bool = described(False, "Nesterov momentum (lars, sgd); needs momentum > 0")
    clip: bool = described(False, "lars: LARC clip mode, the effective rate lr * r is capped at lr")
    betas: tuple[float, float] = described((0.9, 0.999), "LAMB's moment decay rates, each in [0, 1)")
    exclude_bias_and_norm: bool = described(True, "biases and norm weights: no trust ratio, no weight decay")
    fused: bool = described(False, "lars: an alias of implementation=compiled (kept for old configs)")
    implementation: str = described("auto", "optimizer path: auto (triton on CUDA, foreach on CPU), triton, foreach, "
                                    "compiled (lars) or single; sgd: auto")
    label_smoothing: float = described(0.0, "cross-entropy label smoothing, in [0, 1)")


@dataclass
class ScheduleConfig:
    warmup_epochs: float = described(0.0, "linear warm-up length in epochs")
    warmup_start_lr: float = described(0.0, "learning rate at the first warm-up step")
    decay: str = described("poly", "after warm-up: poly, cosine, step or constant")
    power: float = described(2.0, "poly decay power (> 0)")
    end_lr: float = described(0.0, "learning rate at the last step (poly, cosine)")
    decay_origin: str = described("warmup_end", "poly/cosine counted from warmup_end or from zero (Intel Caffe)")
    milestones: list[float] = field(default_factory=list, metadata={
        "about": "step decay: increasing epochs at which the rate is multiplied by gamma"})
    gamma: float = described(0.1, "step decay factor (> 0)")
    scaling: str = described("none", "lr as given (none) or scaled from reference_batch (linear, sqrt)")
    reference_batch: int = described(256, "batch size at which optim.lr holds, for scaling")


@dataclass
class DistConfig:
    grad_dtype: str = described("fp32", "dtype of the all-reduced gradients: bf16/fp16 halve the bytes (DDP comm hook)")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    batch_size: int = described(8192, "global batch: processes x micro_batch x accumulation")
    micro_batch: int | None = described(None, "per process; default batch_size / world (no accumulation)")
    epochs: int = described(10, "epochs to train")
    seed: int = described(0, "seed for initialisation, data order and augmentation")
    precision: str = described("auto", "autocast: auto (bf16 where fast), fp32, bf16 or fp16")
    device: str = described("auto", "auto (cuda when available), cpu or cuda")
    threads: int | None = described(None, "CPU threads per process; default cores / local processes")
    eval_every: int = described(1, "evaluate every N epochs (and at the end); 0: never")
    checkpoint_every: int = described(0, "checkpoint every N steps; 0: at the end of every epoch")
    keep_checkpoints: int = described(2, "step checkpoints kept (best.pt is kept apart)")
    log_every: int = described(1, "a metrics row every N steps")
    out: str = described("runs/default", "run directory")
    progress: bool = described(True, "progress line on rank 0")
    dist_timeout_s: float = described(600.0, "a collective waiting longer than this for a lost peer fails")
    cuda_graphs: str | bool = described(
        "auto", "replay each step as one CUDA graph: auto (where it is correct), on or off")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, for error messages and --help."""
    keys = []
    for name, tp in _hints(cls).items():
        if _is_dataclass_type(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the harmless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        item_types = args if origin is tuple else (args[0],) * len(value)
        items = [_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
        return tuple(items) if origin is tuple else items
    return value


def unknown_key_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}; allowed: {', '.join(allowed)}"


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(unknown_key_message(dotted, all_keys(cls, prefix)))
        tp = hints[key]
        kwargs[key] = _build(tp, value, f"{dotted}.") if _is_dataclass_type(tp) else _coerce(dotted, value, tp)
    return cls(**kwargs)


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}' goes through '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def split_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value), the value read as YAML (numbers, booleans, lists, null);
    text that is not valid YAML stays a string. The key is not checked here."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = load_yaml(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key, value


def parse_override(text: str) -> tuple[str, Any]:
    """A ``--set key=value`` of the trainer: the key must exist (or lie inside an options mapping)."""
    key, value = split_assignment(text)
    keys = all_keys()
    if key not in keys and not any(key.startswith(f"{k}.") for k in keys if k.endswith("options")):
        raise ConfigError(unknown_key_message(key, keys))
    return key, value


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (model, data, optim, schedule) -> dotted keys; option mappings
    (model.options, data.options) and keys already dotted stay as they are."""
    sections = {name for name, tp in _hints(TrainConfig).items() if _is_dataclass_type(tp)}
    out: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and dotted in sections:
            out.update(flatten_keys(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config trees, apart from RESUMABLE_CHANGES."""
    a, b = flatten_keys(old), flatten_keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def describe_keys(cls: type = TrainConfig, prefix: str = "", instance: Any = None) -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line description) for every key, in declaration order."""
    instance = cls() if instance is None else instance
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(type(value), f"{prefix}{f.name}.", value)
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("about", "")))
    return rows


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping; ``what`` names it in the one-line errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {first_line(err)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must hold a mapping, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then overrides (dotted keys), then validation.

    A mapping is set before the keys inside it (stable, by depth), so ``--workers 2`` (that is
    ``data.options.workers``) survives ``--set data.options={...}`` wherever each was given; for
    the same key the later override wins.
    """
    tree = read_yaml_mapping(path, "config file") if path is not None else {}
    for key, value in sorted(overrides or [], key=lambda pair: pair[0].count(".")):
        set_dotted(tree, key, value)
    config = _build(TrainConfig, tree, "")
    validate(config)
    return config


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


def validate(config: TrainConfig) -> None:
    """Checks that need no knowledge of the world size, the model registry or the data."""
    _choice("optim.name", config.optim.name, OPTIMIZERS)
    _choice("precision", config.precision, PRECISIONS)
    _choice("device", config.device, DEVICES)
    _choice("dist.grad_dtype", config.dist.grad_dtype, GRAD_DTYPES)
    if isinstance(config.cuda_graphs, bool):
        config.cuda_graphs = "on" if config.cuda_graphs else "off"
    _choice("cuda_graphs", config.cuda_graphs, CUDA_GRAPHS)
    _choice("schedule.decay", config.schedule.decay, DECAYS)
    _choice("schedule.scaling", config.schedule.scaling, SCALING_RULES)
    _choice("schedule.decay_origin", config.schedule.decay_origin, ORIGINS)
    if not 0.0 <= config.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {config.optim.momentum}")
    _positive("optim.weight_decay", config.optim.weight_decay, allow_zero=True)
    _positive("optim.trust_coefficient", config.optim.trust_coefficient)
    _positive("batch_size", config.batch_size)
    _positive("epochs", config.epochs)
    _positive("data.eval_batch", config.data.eval_batch)
    _positive("eval_every", config.eval_every, allow_zero=True)
    _positive("log_every", config.log_every)
    _positive("keep_checkpoints", config.keep_checkpoints)
    _positive("checkpoint_every", config.checkpoint_every, allow_zero=True)
    _positive("schedule.warmup_epochs", config.schedule.warmup_epochs, allow_zero=True)
    _positive("schedule.warmup_start_lr", config.schedule.warmup_start_lr, allow_zero=True)
    _positive("schedule.end_lr", config.schedule.end_lr, allow_zero=True)
    _positive("schedule.reference_batch", config.schedule.reference_batch)
    for i, beta in enumerate(config.optim.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
    if config.optim.eps is not None:
        _positive("optim.eps", config.optim.eps, allow_zero=config.optim.name != "lamb")
    _check_optimizer(config.optim)
    _check_direction(config)
    if config.optim.nesterov and config.optim.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0, got 0.0")
    _check_schedule(config.schedule, config.epochs)
    if not 0.0 <= config.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {config.optim.label_smoothing}")
    if config.micro_batch is not None:
        _positive("micro_batch", config.micro_batch)
        if config.micro_batch > config.batch_size:
            raise ConfigError(
                f"micro_batch {config.micro_batch} is larger than the global batch_size {config.batch_size}"
            )
    if config.schedule.warmup_epochs > config.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs {config.schedule.warmup_epochs} exceeds epochs {config.epochs}"
        )
    _positive("dist_timeout_s", config.dist_timeout_s)
    if config.threads is not None:
        _positive("threads", config.threads)
        cores = os.cpu_count() or 1
        if config.threads > cores:
            raise ConfigError(f"threads {config.threads} exceeds the {cores} CPU cores of this machine")
    if not 0 <= config.seed < SEED_LIMIT:
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
    if not config.out.strip():
        raise ConfigError("out must name a run directory, got ''")
    if config.data.name == "synthetic" and config.data.root is not None:
        raise ConfigError(f"data.root ({config.data.root}) is not read by synthetic data; "
                          "remove --data-dir or choose --data fashion_mnist or imagefolder")
    config.out = os.path.expanduser(config.out)
    if config.data.root is not None:
        config.data.root = os.path.expanduser(config.data.root)


def _check_optimizer(o: OptimConfig) -> None:
    """The optimizer's own keys, from OPTIMIZER_TABLE; fills in its defaults (lr, eps) and folds
    the ``fused`` alias into ``implementation``."""
    spec = OPTIMIZER_TABLE[o.name]
    defaults = OptimConfig()
    for f in dataclasses.fields(OptimConfig):
        if f.name in COMMON_KEYS or f.name in spec.keys:
            continue
        if getattr(o, f.name) != getattr(defaults, f.name):
            users = [n for n, other in OPTIMIZER_TABLE.items() if f.name in other.keys]
            raise ConfigError(f"optim.{f.name} applies to {' and '.join(users)} only, not to optim.name={o.name}; "
                              f"remove it")
    if o.fused:
        if o.implementation not in ("auto", "compiled"):
            raise ConfigError(f"optim.fused=true means optim.implementation=compiled, but optim.implementation="
                              f"{o.implementation} was also given; give one of them")
        o.fused, o.implementation = False, "compiled"
    _choice("optim.implementation", o.implementation, spec.implementations)
    if o.lr is None:
        o.lr = spec.default_lr
    if o.eps is None:
        o.eps = spec.default_eps
    _positive("optim.lr", o.lr)


def _check_direction(config: TrainConfig) -> None:
    """Refuse a schedule that runs backwards, measured against the peak after the scaling rule."""
    s = config.schedule
    peak = config.optim.lr
    if s.scaling != "none":
        scale = linear_scaling if s.scaling == "linear" else sqrt_scaling
        peak = scale(peak, config.batch_size, s.reference_batch)
    names = ("optim.lr" if s.scaling == "none" else f"optim.lr (after {s.scaling} scaling)",
             "schedule.warmup_start_lr", "schedule.end_lr", "schedule.gamma")
    reason = backwards_reason(peak, s.warmup_start_lr if s.warmup_epochs else 0.0,
                              s.end_lr if s.decay in ("poly", "cosine") else 0.0,
                              s.gamma if s.decay == "step" else 1.0, names)
    if reason:
        raise ConfigError(reason)


def _check_schedule(s: ScheduleConfig, epochs: int) -> None:
    """The schedule's own options, checked here so that each error names its key."""
    _positive("schedule.power", s.power)
    _positive("schedule.gamma", s.gamma)
    for i, m in enumerate(s.milestones):
        if not 0 < m <= epochs or not math.isfinite(m):
            raise ConfigError(f"schedule.milestones[{i}] must be an epoch in (0, epochs={epochs}], got {m}")
    if any(b <= a for a, b in zip(s.milestones, s.milestones[1:], strict=False)):
        raise ConfigError(f"schedule.milestones must be increasing, got {s.milestones}")


def to_dict(config: TrainConfig) -> dict:
    """Plain data (lists for tuples) for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def from_dict(tree: dict) -> TrainConfig:
    config = _build(TrainConfig, tree, "")
    validate(config)
    return config


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def derive_accumulation(batch_size: int, micro_batch: int, world_size: int) -> int:
    """Global batch = world x micro-batch x accumulation; refuse what does not divide."""
    per_step = world_size * micro_batch
    if batch_size % per_step != 0:
        raise on_every_rank(ConfigError(
            f"batch_size {batch_size} is not divisible by world size {world_size} x micro_batch {micro_batch} "
            f"(= {per_step}); {_dividing(batch_size, per_step)}"
        ))
    return batch_size // per_step


def _dividing(batch_size: int, unit: int) -> str:
    """The nearest batch sizes that would divide, for the error message."""
    below, above = batch_size // unit * unit, (batch_size // unit + 1) * unit
    near = f"{below} or {above}" if below else str(above)
    return f"choose a batch_size that is a multiple of {unit} (e.g. {near})"


def batch_plan(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for this world size; the global batch never changes.

    Without a micro-batch in the config each process takes batch / world (no accumulation).
    On resume with another world size the accumulation is derived anew, so the run continues
    with the same global batch, or stops here with the numbers that do not divide.
    """
    if config.micro_batch is None:
        if config.batch_size % world_size:
            raise on_every_rank(ConfigError(f"batch_size {config.batch_size} is not divisible by world size "
                                            f"{world_size}; {_dividing(config.batch_size, world_size)}"))
        return config.batch_size // world_size, 1
    return config.micro_batch, derive_accumulation(config.batch_size, config.micro_batch, world_size)
