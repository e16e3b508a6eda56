"""Closed-form all-reduce costs against a counted step-by-step execution of each algorithm."""

import pytest

from largebatch.plan import costs, simulate
from largebatch.plan.costs import Network

ELEM = 4


def _elems(p: int) -> int:
    # a multiple of p and of 16 (>= 2**floor(lg p)), so every chunk of every schedule is whole
    return 48 * p


@pytest.mark.parametrize("algorithm", list(costs.ALGORITHMS))
@pytest.mark.parametrize("p", range(1, 17))
def test_closed_form_matches_simulation(algorithm, p):
    counted = simulate.simulate(algorithm, p, _elems(p), ELEM)
    n = _elems(p) * ELEM
    closed = costs.allreduce_terms(algorithm, p, n)
    assert counted.messages == closed.messages
    assert counted.bytes_sent == pytest.approx(closed.bytes_sent, rel=1e-12)
    assert counted.bytes_reduced == pytest.approx(closed.bytes_reduced, rel=1e-12)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_power_of_two_forms_are_the_papers(p):
    n, k = 1e6, p.bit_length() - 1
    f = (p - 1) / p
    assert costs.ring(p, n) == costs.CostTerms(2 * (p - 1), 2 * n * f, n * f)
    assert costs.recursive_doubling(p, n) == costs.CostTerms(k, k * n, k * n)
    assert costs.rabenseifner(p, n) == costs.CostTerms(2 * k, 2 * n * f, n * f)
    assert costs.binomial(p, n) == costs.CostTerms(2 * k, 2 * n * k, n * k)


def test_ring_simulation_with_uneven_chunks_still_sums():
    # 1001 elements over 6 ranks: chunks of 166 and 167 elements; each step pays for the largest
    terms = simulate.simulate("ring", 6, 1001, ELEM)
    assert terms.messages == 10
    assert terms.bytes_sent == 2 * 5 * 167 * ELEM


def test_simulator_rejects_two_sends_in_a_step():
    bad = [[simulate.Message(0, 1, 0, 4, True), simulate.Message(0, 2, 0, 4, True)]]
    with pytest.raises(AssertionError):
        simulate.count(bad, 3)


def test_best_algorithm_latency_vs_bandwidth_regimes():
    net = Network(alpha=1e-5, beta=1e-9, gamma=1e-10)
    small, _ = costs.best_algorithm(16, 8, net)
    large, _ = costs.best_algorithm(16, 256e6, net)
    assert small == "recursive_doubling"  # fewest messages: lg p
    assert large in ("ring", "rabenseifner")  # both send 2n(p-1)/p, Rabenseifner with fewer messages
    assert large == "rabenseifner"


def test_allreduce_time_by_hand():
    net = Network(alpha=2e-6, beta=1e-10, gamma=5e-11)
    # ring, p = 4, n = 1 MB: 6 a + 1.5 MB b + 0.75 MB g
    expected = 6 * 2e-6 + 1.5e6 * 1e-10 + 0.75e6 * 5e-11
    assert costs.allreduce_time("ring", 4, 1e6, net) == pytest.approx(expected)
    assert costs.allreduce_time("best", 1, 1e6, net) == 0.0
    with pytest.raises(ValueError, match="unknown all-reduce"):
        costs.allreduce_time("tree", 4, 1e6, net)


# ---- two-level (hierarchical) all-reduce ---------------------------------------------------------


@pytest.mark.parametrize("inter", list(costs.ALGORITHMS))
@pytest.mark.parametrize(("p", "per_node"), [(2, 2), (4, 2), (6, 2), (8, 4), (12, 4), (16, 8), (24, 8), (3, 8), (5, 1)])
def test_hierarchical_closed_form_matches_simulation(inter, p, per_node):
    n_elems = 48 * p  # whole chunks at every level: a multiple of k * 2**floor(lg m)
    counted = simulate.simulate_hierarchical(p, per_node, n_elems, inter, ELEM)
    closed = costs.hierarchical(p, per_node, n_elems * ELEM, inter)
    for level in ("intra", "inter"):
        got, want = getattr(counted, level), getattr(closed, level)
        assert got.messages == want.messages, level
        assert got.bytes_sent == pytest.approx(want.bytes_sent, rel=1e-12), level
        assert got.bytes_reduced == pytest.approx(want.bytes_reduced, rel=1e-12), level


def test_hierarchical_by_hand_and_against_flat_ring():
    # 4 nodes of 8, n = 64 MB, ring across nodes on 8 MB shares:
    # inside: 14 messages, 2 * 64 * 7/8 = 112 MB sent, 56 MB reduced; between: 6, 2 * 8 * 3/4 = 12 MB, 6 MB
    mb = 2**20
    terms = costs.hierarchical(32, 8, 64 * mb, "ring")
    assert terms.intra == costs.CostTerms(14, 112 * mb, 56 * mb)
    assert terms.inter == costs.CostTerms(6, 12 * mb, 6 * mb)
    fast, slow = Network(1e-6, 1 / 400e9), Network(5e-6, 1 / 50e9)
    net = costs.TwoLevelNetwork(intra=fast, inter=slow, per_node=8)
    flat = costs.allreduce_time("ring", 32, 64 * mb, net)  # every hop priced as the slow level
    assert flat == pytest.approx(costs.ring(32, 64 * mb).time(slow))
    two = costs.allreduce_time("hierarchical", 32, 64 * mb, net)  # the cheapest algorithm between nodes
    assert two == pytest.approx(min(costs.hierarchical(32, 8, 64 * mb, a).time(net) for a in costs.ALGORITHMS))
    # 4 nodes: Rabenseifner sends what the ring sends in 4 messages instead of 6
    assert two == pytest.approx(terms.intra.time(fast) + terms.inter.time(slow) - 2 * slow.alpha)
    assert two < flat / 3  # the slow links carry 1/8 of the data
    assert costs.best_algorithm(32, 64 * mb, net)[0].startswith("hierarchical(")


def test_hierarchical_needs_whole_nodes_and_two_levels():
    with pytest.raises(ValueError, match="multiple of 8"):
        costs.hierarchical(12, 8, 1e6)
    with pytest.raises(ValueError, match="two-level"):
        costs.allreduce_time("hierarchical", 16, 1e6, Network(1e-6, 1e-9))
    # one node: the ring inside it, nothing between nodes
    one = costs.hierarchical(8, 8, 1e6)
    assert one.intra == costs.ring(8, 1e6) and one.inter == costs.CostTerms(0, 0, 0)
