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
