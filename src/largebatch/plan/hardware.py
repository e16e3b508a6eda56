"""Hardware descriptions: one small YAML file per machine, validated into a ``Hardware``.

A file gives what one *process* has: its network figures (alpha, beta, gamma of the all-reduce
cost model) and its compute, either as a sustained rate in FLOP/s (``flops``, or ``peak_flops``
times an explicit ``sustained_fraction``), as measured training images/s per model
(``images_per_s``), or as a measured step time t(b) = fixed_s + b * per_image_s per model
(``step_time``, fitted by ``largebatch bench compute --batch 32,64,256``). Every number should say
where it comes from: the shipped files (``largebatch/plan/hardware/*.yaml``) do so in comments and
in ``sources``.

A machine of nodes (GPUs on NVLink inside a node, a network port per GPU between nodes) adds a
``node`` section: processes per node and the (alpha, beta, gamma) of the links inside a node;
``network`` then describes the links between nodes, and the ``hierarchical`` all-reduce uses both.

    name: stampede2-knl
    description: one Intel Xeon Phi 7250 node per process, 100 Gb/s Omni-Path
    compute:
      peak_flops: 6.09e12
      sustained_fraction: 0.4
      memory_bandwidth: 4.0e11      # optional: bytes/s, prices the optimizer update
      images_per_s: {resnet50: 95.0} # optional: measured, preferred over FLOP/s
      step_time: {resnet50: {fixed_s: 0.004, per_image_s: 0.0002}}  # optional: preferred over both
    network: {alpha: 3.0e-6, beta: 8.0e-11, gamma: 7.0e-12, algorithm: ring}
    node: {processes: 8, alpha: 3.0e-6, beta: 2.5e-12, gamma: 1.0e-12}  # optional: two levels
    sources: ["..."]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from largebatch.errors import first_line
from largebatch.plan.costs import ALGORITHMS, HIERARCHICAL, Network, TwoLevelNetwork
from largebatch.plan.errors import PlanError
from largebatch.yaml_numbers import load_yaml

__all__ = ["ALGORITHM_CHOICES", "Hardware", "StepTime", "list_hardware", "load_hardware", "parse_hardware",
           "render_hardware"]

_TOP = {"name", "description", "compute", "network", "node", "sources"}
_COMPUTE = {"flops", "peak_flops", "sustained_fraction", "memory_bandwidth", "images_per_s", "step_time"}
_NETWORK = {"alpha", "beta", "gamma", "algorithm", "processes"}
_NODE = {"processes", "alpha", "beta", "gamma"}
_STEP = {"fixed_s", "per_image_s", "batches"}
ALGORITHM_CHOICES = ("best", *ALGORITHMS, HIERARCHICAL)


@dataclass(frozen=True)
class StepTime:
    """A measured training step: fixed_s (launches, optimizer, per step) + batch * per_image_s."""

    fixed_s: float
    per_image_s: float
    batches: tuple[int, ...] = ()  # the per-process batches it was fitted on

    def seconds(self, batch: float) -> float:
        return self.fixed_s + batch * self.per_image_s


@dataclass(frozen=True)
class Hardware:
    """What one process has. ``flops`` is sustained FLOP/s (None if only measured rates are known).

    ``network`` prices every link on a flat machine and the links between nodes on a two-level one
    (``node`` set: processes per node and the links inside it). ``algorithm`` is the file's default
    all-reduce; ``measured_processes`` the process count its network figures were fitted with.
    """

    name: str
    network: Network
    flops: float | None = None
    images_per_s: dict[str, float] = field(default_factory=dict)
    memory_bandwidth: float | None = None
    description: str = ""
    sources: tuple[str, ...] = ()
    peak_flops: float | None = None
    step_time: dict[str, StepTime] = field(default_factory=dict)
    node: TwoLevelNetwork | None = None
    algorithm: str | None = None
    measured_processes: int | None = None

    @property
    def links(self) -> Network | TwoLevelNetwork:
        """What the all-reduce cost model prices: the flat network, or both levels."""
        return self.node if self.node is not None else self.network


def _number(value: Any, where: str, *, positive: bool = True, at_most: float | None = None) -> float:
    # PyYAML reads "1e-6" (no dot) as a string; accept it, reject everything else that is not a number
    if isinstance(value, bool):
        raise PlanError(f"{where} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(x) or (x <= 0 if positive else x < 0):
        raise PlanError(f"{where} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    if at_most is not None and x > at_most:
        raise PlanError(f"{where} must be at most {at_most}, got {value!r}")
    return x


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PlanError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{where} must be a positive whole number, got {value!r}")
    return value


def _links(section: dict[str, Any], where: str) -> Network:
    for key in ("alpha", "beta"):
        if key not in section:
            raise PlanError(f"{where}.{key} is required")
    return Network(
        alpha=_number(section["alpha"], f"{where}.alpha"),
        beta=_number(section["beta"], f"{where}.beta"),
        gamma=_number(section.get("gamma", 0.0), f"{where}.gamma", positive=False),
    )


def _step_times(raw: Any, where: str) -> dict[str, StepTime]:
    if not isinstance(raw, dict):
        raise PlanError(f"{where} must map model names to {{fixed_s, per_image_s}}")
    out = {}
    for model, fit in raw.items():
        fit = _mapping(fit, f"{where}.{model}", _STEP)
        for key in ("fixed_s", "per_image_s"):
            if key not in fit:
                raise PlanError(f"{where}.{model}.{key} is required")
        batches = fit.get("batches", []) or []
        if not isinstance(batches, list):
            raise PlanError(f"{where}.{model}.batches must be a list of batch sizes")
        out[str(model)] = StepTime(
            fixed_s=_number(fit["fixed_s"], f"{where}.{model}.fixed_s", positive=False),
            per_image_s=_number(fit["per_image_s"], f"{where}.{model}.per_image_s"),
            batches=tuple(_count(b, f"{where}.{model}.batches") for b in batches),
        )
    return out


def parse_hardware(data: Any, origin: str = "<hardware>") -> Hardware:
    """Validate a loaded YAML document; every error names the file and the offending key."""
    top = _mapping(data, origin, _TOP)
    if "network" not in top:
        raise PlanError(f"{origin}: missing 'network' (alpha, beta, gamma)")
    net = _mapping(top["network"], f"{origin}: network", _NETWORK)
    network = _links(net, f"{origin}: network")
    node = None
    if top.get("node") is not None:
        raw_node = _mapping(top["node"], f"{origin}: node", _NODE)
        if "processes" not in raw_node:
            raise PlanError(f"{origin}: node.processes (processes per node) is required")
        node = TwoLevelNetwork(intra=_links(raw_node, f"{origin}: node"), inter=network,
                               per_node=_count(raw_node["processes"], f"{origin}: node.processes"))
    algorithm = net.get("algorithm")
    if algorithm is not None and algorithm not in ALGORITHM_CHOICES:
        raise PlanError(f"{origin}: network.algorithm must be one of {', '.join(ALGORITHM_CHOICES)}; got {algorithm!r}")
    if algorithm == HIERARCHICAL and node is None:
        raise PlanError(f"{origin}: network.algorithm hierarchical needs a node section (processes per node, links)")
    measured = net.get("processes")
    measured = None if measured is None else _count(measured, f"{origin}: network.processes")
    comp = _mapping(top.get("compute", {}), f"{origin}: compute", _COMPUTE)
    flops = peak = None
    if "flops" in comp:
        if "peak_flops" in comp or "sustained_fraction" in comp:
            raise PlanError(f"{origin}: give compute.flops or compute.peak_flops with sustained_fraction, not both")
        flops = _number(comp["flops"], f"{origin}: compute.flops")
    elif "peak_flops" in comp or "sustained_fraction" in comp:
        if not ("peak_flops" in comp and "sustained_fraction" in comp):
            raise PlanError(f"{origin}: compute.peak_flops and compute.sustained_fraction go together")
        peak = _number(comp["peak_flops"], f"{origin}: compute.peak_flops")
        flops = peak * _number(comp["sustained_fraction"], f"{origin}: compute.sustained_fraction", at_most=1.0)
    ips_raw = comp.get("images_per_s", {}) or {}
    if not isinstance(ips_raw, dict):
        raise PlanError(f"{origin}: compute.images_per_s must map model names to images/s")
    images_per_s = {str(k): _number(v, f"{origin}: compute.images_per_s.{k}") for k, v in ips_raw.items()}
    step_time = _step_times(comp.get("step_time", {}) or {}, f"{origin}: compute.step_time")
    if flops is None and not images_per_s and not step_time:
        raise PlanError(
            f"{origin}: compute needs flops, peak_flops with sustained_fraction, images_per_s or step_time"
        )
    membw = comp.get("memory_bandwidth")
    sources = top.get("sources", []) or []
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise PlanError(f"{origin}: sources must be a list of strings")
    name = top.get("name")
    if not isinstance(name, str) or not name:
        raise PlanError(f"{origin}: name must be a non-empty string")
    return Hardware(
        name=name,
        network=network,
        flops=flops,
        images_per_s=images_per_s,
        memory_bandwidth=None if membw is None else _number(membw, f"{origin}: compute.memory_bandwidth"),
        description=str(top.get("description", "")),
        sources=tuple(sources),
        peak_flops=peak,
        step_time=step_time,
        node=node,
        algorithm=algorithm,
        measured_processes=measured,
    )


def _builtin_dir():
    return resources.files("largebatch.plan") / "hardware"


def list_hardware() -> list[str]:
    """Names of the hardware files shipped with the package."""
    return sorted(p.name[: -len(".yaml")] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_hardware(spec: str | Path) -> Hardware:
    """Load a shipped description by name (``stampede2-knl``) or any YAML file by path."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise PlanError(f"hardware file {str(spec)!r} does not exist")
        text, origin = path.read_text(), str(path)
    else:
        entry = _builtin_dir() / f"{spec}.yaml"
        if not entry.is_file():
            shipped = ", ".join(list_hardware())
            raise PlanError(f"unknown hardware {str(spec)!r}; shipped: {shipped}, or give a .yaml path")
        text, origin = entry.read_text(), f"{spec}.yaml"
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise PlanError(f"{origin}: not valid YAML ({first_line(err)})") from None
    return parse_hardware(data, origin)


def render_hardware(data: dict[str, Any], header: str = "") -> str:
    """YAML text for a description (used by ``largebatch bench`` to write measured files)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return "\n".join([*lines, body]) if lines else body
