"""Step-by-step simulators of the all-reduce algorithms, to check the closed forms in costs.py.

Each process holds a vector of integers; the algorithm is run as a sequence of synchronous steps,
each a list of messages (source, destination, element range, reduce-or-copy). A step costs one
alpha if any message moves, beta times the largest number of bytes a process sends or receives in
it, and gamma times the largest number of bytes a process reduces in it -- the model of Thakur,
Rabenseifner and Gropp, where a process sends at most one message and receives at most one per
step (bidirectional links). Summing over steps gives the critical-path coefficients, and the
final vectors are checked against the true sum, so a wrong schedule cannot pass on counts alone.

The two-level scheme (``simulate_hierarchical``) numbers processes node by node (rank = node * k
+ local) and counts the steps inside nodes and between nodes apart, each level for its own
(alpha, beta, gamma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from largebatch.plan.costs import CostTerms, LevelTerms, node_layout

__all__ = ["Message", "count", "count_levels", "hierarchical_schedule", "run", "schedule", "simulate",
           "simulate_hierarchical"]


@dataclass(frozen=True)
class Message:
    src: int
    dst: int
    lo: int
    hi: int
    reduce: bool  # True: dst adds the range into its own; False: dst overwrites it


Step = list[Message]


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _ring(p: int, n: int) -> list[Step]:
    ch = _chunks(n, p)
    steps: list[Step] = []
    for s in range(p - 1):  # reduce-scatter: after it rank r owns the full sum of chunk (r+1) % p
        steps.append([Message(r, (r + 1) % p, *ch[(r - s) % p], True) for r in range(p)])
    for s in range(p - 1):  # all-gather: pass the finished chunks on around the ring
        steps.append([Message(r, (r + 1) % p, *ch[(r + 1 - s) % p], False) for r in range(p)])
    return steps


def _fold(p: int, n: int) -> tuple[int, Step, Step]:
    """Fold the p - p' extra ranks into ranks 0..r-1 (before) and return the result (after)."""
    pp = 1 << (p.bit_length() - 1)
    extra = p - pp
    before = [Message(pp + i, i, 0, n, True) for i in range(extra)]
    after = [Message(i, pp + i, 0, n, False) for i in range(extra)]
    return pp, before, after


def _recursive_doubling(p: int, n: int) -> list[Step]:
    pp, before, after = _fold(p, n)
    steps: list[Step] = [before] if before else []
    mask = 1
    while mask < pp:
        steps.append([Message(r, r ^ mask, 0, n, True) for r in range(pp)])
        mask <<= 1
    if after:
        steps.append(after)
    return steps


def _rabenseifner(p: int, n: int) -> list[Step]:
    pp, before, after = _fold(p, n)
    steps: list[Step] = [before] if before else []
    window = {r: (0, n) for r in range(pp)}
    history: list[dict[int, tuple[int, int]]] = []
    mask = pp >> 1
    while mask >= 1:  # recursive halving: keep one half, send the other to the partner
        history.append(dict(window))
        step = []
        new = {}
        for r in range(pp):
            lo, hi = window[r]
            mid = (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if r & mask == 0 else ((mid, hi), (lo, mid))
            step.append(Message(r, r ^ mask, *give, True))
            new[r] = keep
        window = new
        steps.append(step)
        mask >>= 1
    mask = 1
    while mask < pp:  # recursive doubling: exchange finished windows, undoing the halving
        steps.append([Message(r, r ^ mask, *window[r], False) for r in range(pp)])
        window = history.pop()
        mask <<= 1
    if after:
        steps.append(after)
    return steps


def _binomial(p: int, n: int) -> list[Step]:
    steps: list[Step] = []
    mask = 1
    while mask < p:  # reduce towards rank 0
        steps.append([Message(r, r - mask, 0, n, True) for r in range(p) if r % (2 * mask) == mask])
        mask <<= 1
    mask >>= 1
    while mask >= 1:  # broadcast back out along the same tree
        steps.append([Message(r, r + mask, 0, n, False) for r in range(0, p, 2 * mask) if r + mask < p])
        mask >>= 1
    return steps


_SCHEDULES = {
    "ring": _ring,
    "recursive_doubling": _recursive_doubling,
    "rabenseifner": _rabenseifner,
    "binomial": _binomial,
}


def schedule(algorithm: str, p: int, n: int) -> list[Step]:
    """The algorithm's messages, step by step, for p processes and n vector elements."""
    if p == 1:
        return []
    return _SCHEDULES[algorithm](p, n)


def hierarchical_schedule(p: int, per_node: int, n: int, inter_algorithm: str) -> list[Step]:
    """Ring reduce-scatter in every node, ``inter_algorithm`` per share across nodes, ring all-gather.

    Every node runs the same step at once; in the middle phase the m processes with the same local
    rank (one per node) all-reduce the share that rank owns, all k shares in parallel.
    """
    k, m = node_layout(p, per_node)
    if k == 1:
        return schedule(inter_algorithm, m, n)
    ring = _ring(k, n)
    reduce_scatter, all_gather = ring[: k - 1], ring[k - 1 :]

    def in_every_node(step: Step) -> Step:
        return [Message(node * k + msg.src, node * k + msg.dst, msg.lo, msg.hi, msg.reduce)
                for node in range(m) for msg in step]

    chunks = _chunks(n, k)
    owned = {local: chunks[(local + 1) % k] for local in range(k)}  # what the ring's reduce-scatter leaves
    per_share = {local: schedule(inter_algorithm, m, owned[local][1] - owned[local][0]) for local in range(k)}
    depth = max(len(s) for s in per_share.values())
    across: list[Step] = []
    for i in range(depth):
        step: Step = []
        for local, steps in per_share.items():
            lo = owned[local][0]
            if i < len(steps):
                step += [Message(msg.src * k + local, msg.dst * k + local, lo + msg.lo, lo + msg.hi, msg.reduce)
                         for msg in steps[i]]
        across.append(step)
    return [in_every_node(s) for s in reduce_scatter] + across + [in_every_node(s) for s in all_gather]


def run(steps: list[Step], data: np.ndarray) -> np.ndarray:
    """Execute the steps on data[rank, element]; every send reads the state before its step."""
    data = data.copy()
    for step in steps:
        before = data.copy()
        for m in step:
            if m.reduce:
                data[m.dst, m.lo : m.hi] += before[m.src, m.lo : m.hi]
            else:
                data[m.dst, m.lo : m.hi] = before[m.src, m.lo : m.hi]
    return data


def count(steps: list[Step], p: int, elem_bytes: int = 4) -> CostTerms:
    """Critical-path messages, bytes sent and bytes reduced, summing each step's maximum.

    Raises if a process sends or receives more than one message in a step, which the model forbids.
    """
    messages = sent = reduced = 0
    for step in steps:
        if not step:
            continue
        out = [0] * p
        inc = [0] * p
        nsend = [0] * p
        nrecv = [0] * p
        red = [0] * p
        for m in step:
            size = (m.hi - m.lo) * elem_bytes
            out[m.src] += size
            inc[m.dst] += size
            nsend[m.src] += 1
            nrecv[m.dst] += 1
            if m.reduce:
                red[m.dst] += size
        if max(nsend) > 1 or max(nrecv) > 1:
            raise AssertionError("a process sends or receives twice in one step")
        messages += 1
        sent += max(max(out), max(inc))
        reduced += max(red)
    return CostTerms(messages, sent, reduced)


def count_levels(steps: list[Step], p: int, per_node: int, elem_bytes: int = 4) -> LevelTerms:
    """``count`` for each level apart; a step must stay inside nodes or go only between them."""
    inside: list[Step] = []
    between: list[Step] = []
    for step in steps:
        same = {m.src // per_node == m.dst // per_node for m in step}
        if len(same) > 1:
            raise AssertionError("a step mixes messages inside nodes with messages between nodes")
        (inside if same == {True} else between).append(step)
    return LevelTerms(count(inside, p, elem_bytes), count(between, p, elem_bytes))


def _check_sum(steps: list[Step], p: int, n: int, seed: int, what: str) -> None:
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1000, size=(p, n)).astype(np.int64)
    if not (run(steps, data) == data.sum(axis=0)).all():
        raise AssertionError(f"{what} with p={p} did not leave the full sum on every rank")


def simulate_hierarchical(p: int, per_node: int, n: int, inter_algorithm: str = "ring", elem_bytes: int = 4,
                          seed: int = 0) -> LevelTerms:
    """Run the two-level scheme on random vectors, check the sum everywhere, count each level."""
    steps = hierarchical_schedule(p, per_node, n, inter_algorithm)
    _check_sum(steps, p, n, seed, f"hierarchical({inter_algorithm}), {per_node} per node,")
    return count_levels(steps, p, min(p, per_node), elem_bytes)


def simulate(algorithm: str, p: int, n: int, elem_bytes: int = 4, seed: int = 0) -> CostTerms:
    """Run the algorithm on random integer vectors, check every rank ends with the sum, count it."""
    steps = schedule(algorithm, p, n)
    _check_sum(steps, p, n, seed, algorithm)
    return count(steps, p, elem_bytes)
