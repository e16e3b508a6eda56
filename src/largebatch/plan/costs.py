"""All-reduce cost in the alpha-beta-gamma model (Thakur, Rabenseifner, Gropp 2005, MPICH).

A cost is kept as its three coefficients -- messages on the critical path (times alpha), bytes
sent on it (times beta) and bytes reduced on it (times gamma) -- so that tests can compare each
coefficient with a step-by-step simulation (``simulate.py``) rather than only a total time.

Non-powers of two: recursive doubling and Rabenseifner's algorithm first fold the r = p - p'
extra processes (p' = 2**floor(lg p)) into partners with one full-vector message and, at the end,
send them the result with one more. The fractions then involve p', not p: the usual statement
of the non-power-of-two Rabenseifner cost, (2(p-1)/p + 2) n bytes and (1 + (p-1)/p) n reduced,
rounds them; the count of the algorithm gives (2(p'-1)/p' + 2) n and (1 + (p'-1)/p') n, which is
what we use (docs/paper.md, "All-reduce costs").

Two-level machines (GPU nodes: fast links inside a node, one network port per GPU between nodes)
use ``hierarchical``: reduce-scatter inside each node, all-reduce of each 1/k share across the
nodes, all-gather inside each node, each level priced with its own (alpha, beta, gamma).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALGORITHMS",
    "HIERARCHICAL",
    "CostTerms",
    "LevelTerms",
    "Network",
    "TwoLevelNetwork",
    "allreduce_terms",
    "allreduce_time",
    "best_algorithm",
    "binomial",
    "hierarchical",
    "node_layout",
    "rabenseifner",
    "recursive_doubling",
    "ring",
]


@dataclass(frozen=True)
class Network:
    """alpha: seconds per message; beta: seconds per byte sent; gamma: seconds per byte reduced."""

    alpha: float
    beta: float
    gamma: float = 0.0


@dataclass(frozen=True)
class CostTerms:
    """Critical-path coefficients of alpha (messages), beta (bytes sent) and gamma (bytes reduced)."""

    messages: float
    bytes_sent: float
    bytes_reduced: float

    def time(self, net: Network) -> float:
        return self.messages * net.alpha + self.bytes_sent * net.beta + self.bytes_reduced * net.gamma

    def __add__(self, other: CostTerms) -> CostTerms:
        return CostTerms(
            self.messages + other.messages,
            self.bytes_sent + other.bytes_sent,
            self.bytes_reduced + other.bytes_reduced,
        )


_ZERO = CostTerms(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TwoLevelNetwork:
    """Nodes of ``per_node`` processes: ``intra`` prices links inside a node, ``inter`` between nodes.

    Flat algorithms see every link as ``inter`` (the slower level decides a flat ring's pace)
    unless all processes fit in one node.
    """

    intra: Network
    inter: Network
    per_node: int


@dataclass(frozen=True)
class LevelTerms:
    """The cost of a two-level all-reduce: coefficients inside nodes and between them."""

    intra: CostTerms
    inter: CostTerms

    def time(self, net: TwoLevelNetwork) -> float:
        return self.intra.time(net.intra) + self.inter.time(net.inter)


def _check(p: int, n: float) -> None:
    if int(p) != p or p < 1:
        raise ValueError(f"process count must be a positive integer, got {p!r}")
    if n < 0:
        raise ValueError(f"message size must be >= 0 bytes, got {n!r}")


def _floor_lg(p: int) -> int:
    return p.bit_length() - 1


def _ceil_lg(p: int) -> int:
    return (p - 1).bit_length()


def ring(p: int, n: float) -> CostTerms:
    """Reduce-scatter then all-gather around a ring: 2(p-1) a + 2n(p-1)/p b + n(p-1)/p g, any p."""
    _check(p, n)
    if p == 1:
        return _ZERO
    frac = (p - 1) / p
    return CostTerms(2 * (p - 1), 2 * n * frac, n * frac)


def recursive_doubling(p: int, n: float) -> CostTerms:
    """Pairwise exchange of the whole vector: lg p (a + n b + n g) for p a power of two.

    Otherwise (floor(lg p) + 2) a + (floor(lg p) + 2) n b + (floor(lg p) + 1) n g: the fold-in
    step sends and reduces n, the final step sends n back.
    """
    _check(p, n)
    if p == 1:
        return _ZERO
    k = _floor_lg(p)
    if p == 1 << k:
        return CostTerms(k, k * n, k * n)
    return CostTerms(k + 2, (k + 2) * n, (k + 1) * n)


def rabenseifner(p: int, n: float) -> CostTerms:
    """Reduce-scatter by recursive halving, all-gather by recursive doubling.

    2 lg p a + 2n(p-1)/p b + n(p-1)/p g for p a power of two; otherwise, with p' = 2**floor(lg p),
    (2 floor(lg p) + 2) a + (2(p'-1)/p' + 2) n b + (1 + (p'-1)/p') n g.
    """
    _check(p, n)
    if p == 1:
        return _ZERO
    k = _floor_lg(p)
    pp = 1 << k
    frac = (pp - 1) / pp
    if p == pp:
        return CostTerms(2 * k, 2 * n * frac, n * frac)
    return CostTerms(2 * k + 2, (2 * frac + 2) * n, (1 + frac) * n)


def binomial(p: int, n: float) -> CostTerms:
    """Binomial-tree reduce to rank 0 then binomial broadcast: 2 lg p a + 2n lg p b + n lg p g.

    For any p the tree has ceil(lg p) levels, so lg p reads ceil(lg p).
    """
    _check(p, n)
    k = _ceil_lg(p)
    return CostTerms(2 * k, 2 * n * k, n * k)


ALGORITHMS = {
    "ring": ring,
    "recursive_doubling": recursive_doubling,
    "rabenseifner": rabenseifner,
    "binomial": binomial,
}

HIERARCHICAL = "hierarchical"


def node_layout(p: int, per_node: int) -> tuple[int, int]:
    """(processes per node, nodes) for p processes filling nodes of per_node: fewer than a node is one node."""
    _check(per_node, 0)
    k = min(p, per_node)
    if p % k:
        raise ValueError(f"{p} processes do not fill nodes of {per_node}; use a multiple of {per_node}")
    return k, p // k


def hierarchical(p: int, per_node: int, n: float, inter_algorithm: str = "ring") -> LevelTerms:
    """Two-level all-reduce of n bytes on p processes, per_node to a node (p a multiple of it).

    Inside each node of k processes a ring reduce-scatter leaves each process the node's sum of
    one n/k share; the m = p/k processes holding the same share in different nodes all-reduce it
    with ``inter_algorithm`` (all k shares at once, one network port per process); a ring
    all-gather inside each node spreads the result. Inside: 2(k-1) a + 2n(k-1)/k b + n(k-1)/k g,
    i.e. ring(k, n); between nodes: inter_algorithm(m, n/k).
    """
    _check(p, n)
    k, m = node_layout(p, per_node)
    if inter_algorithm not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {inter_algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    return LevelTerms(ring(k, n), ALGORITHMS[inter_algorithm](m, n / k))


def allreduce_terms(algorithm: str, p: int, n: float) -> CostTerms:
    try:
        fn = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}") from None
    return fn(p, n)


def _flat(net: Network | TwoLevelNetwork, p: int) -> Network:
    """The links a flat algorithm sees: inside a node when all p fit in one, else the slower level."""
    if isinstance(net, TwoLevelNetwork):
        return net.intra if p <= net.per_node else net.inter
    return net


def _hierarchical_time(p: int, n: float, net: TwoLevelNetwork) -> tuple[str, float]:
    """The cheapest inter-node algorithm inside the two-level scheme, and the total time."""
    times = {a: hierarchical(p, net.per_node, n, a).time(net) for a in ALGORITHMS}
    best = min(times, key=times.__getitem__)
    return f"{HIERARCHICAL}({best})", times[best]


def allreduce_time(algorithm: str, p: int, n: float, net: Network | TwoLevelNetwork) -> float:
    """Seconds for one all-reduce of n bytes over p processes; ``algorithm='best'`` takes the minimum.

    ``hierarchical`` needs a ``TwoLevelNetwork`` and picks the cheapest algorithm between nodes.
    """
    if algorithm == "best":
        return best_algorithm(p, n, net)[1]
    if algorithm == HIERARCHICAL:
        if not isinstance(net, TwoLevelNetwork):
            raise ValueError("the hierarchical all-reduce needs a two-level network (nodes of several processes)")
        return _hierarchical_time(p, n, net)[1]
    return allreduce_terms(algorithm, p, n).time(_flat(net, p))


def best_algorithm(p: int, n: float, net: Network | TwoLevelNetwork) -> tuple[str, float]:
    """The cheapest algorithm for this size and its time (ties go to the first in ALGORITHMS).

    On a two-level network the hierarchical scheme competes too, named ``hierarchical(<inter>)``,
    when the processes fill whole nodes.
    """
    flat = _flat(net, p)
    best = min(ALGORITHMS, key=lambda name: ALGORITHMS[name](p, n).time(flat))
    found = best, ALGORITHMS[best](p, n).time(flat)
    if isinstance(net, TwoLevelNetwork) and (p <= net.per_node or p % net.per_node == 0):
        two = _hierarchical_time(p, n, net)
        if two[1] < found[1]:
            return two
    return found
