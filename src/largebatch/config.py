"""One dataclass tree for a training run: YAML file + dotted command-line overrides, validated.

Every mistake a user can make here raises ``ConfigError`` with one line that names the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("lars", "lamb", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
CUDA_GRAPHS = ("auto", "on", "off")
DECAYS = ("poly", "cosine", "step", "constant")
SCALING_RULES = ("none", "linear", "sqrt")


class ConfigError(ValueError):
    """A configuration the user can fix; the message is one line."""


@dataclass
class ModelConfig:
    name: str = "resnet_small"
    options: dict = field(default_factory=dict)
    channels_last: bool = True
    compile: bool = False


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None
    augment: bool = True
    eval_batch: int = 2000
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "lars"
    lr: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 0.001
    eps: float = 0.0
    nesterov: bool = False
    clip: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    exclude_bias_and_norm: bool = True
    fused: bool = False
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    decay: str = "poly"
    power: float = 2.0
    end_lr: float = 0.0
    decay_origin: str = "warmup_end"
    milestones: list[float] = field(default_factory=list)  # in epochs, for decay=step
    gamma: float = 0.1
    scaling: str = "none"  # lr as given (none) or scaled from reference_batch (linear, sqrt)
    reference_batch: int = 256


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = 8192
    micro_batch: int | None = None  # per process; default: batch_size / world (no accumulation)
    epochs: int = 10
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None  # per process on CPU; default: cores / local processes
    eval_every: int = 1  # epochs; 0: no evaluation
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch
    keep_checkpoints: int = 2
    log_every: int = 1  # steps
    out: str = "runs/default"
    progress: bool = True
    dist_timeout_s: float = 600.0  # a collective waiting longer than this for a lost peer fails
    # replay each step as one CUDA graph: auto (where it is correct), on, off (YAML reads on/off as
    # booleans: accepted as such)
    cuda_graphs: str | bool = "auto"


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


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}' goes through '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in all_keys() and not any(key.startswith(f"{k}.") for k in all_keys() if k.endswith("options")):
        raise ConfigError(unknown_key_message(key, all_keys()))
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping; ``what`` names it in the one-line errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must hold a mapping, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then overrides (dotted keys), then validation."""
    tree = read_yaml_mapping(path, "config file") if path is not None else {}
    for key, value in overrides or []:
        _set_dotted(tree, key, value)
    config = _build(TrainConfig, tree, "")
    validate(config)
    return config


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(config: TrainConfig) -> None:
    """Checks that need no knowledge of the world size, the model registry or the data."""
    _choice("optim.name", config.optim.name, OPTIMIZERS)
    _choice("precision", config.precision, PRECISIONS)
    _choice("device", config.device, DEVICES)
    if isinstance(config.cuda_graphs, bool):
        config.cuda_graphs = "on" if config.cuda_graphs else "off"
    _choice("cuda_graphs", config.cuda_graphs, CUDA_GRAPHS)
    _choice("schedule.decay", config.schedule.decay, DECAYS)
    _choice("schedule.scaling", config.schedule.scaling, SCALING_RULES)
    _choice("schedule.decay_origin", config.schedule.decay_origin, ("warmup_end", "zero"))
    _positive("optim.lr", config.optim.lr)
    _positive("optim.momentum", config.optim.momentum, allow_zero=True)
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
        raise ConfigError(
            f"batch_size {batch_size} is not divisible by world size {world_size} x micro_batch {micro_batch} "
            f"(= {per_step}); choose a batch_size that is a multiple of {per_step}"
        )
    return batch_size // per_step
