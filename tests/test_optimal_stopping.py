"""The optimal-stopping DP against a brute-force search, Beta shrinkage, λ for a latency budget, and bad input."""
import math
import random

import numpy as np
import pytest
import torch

import specbeam
from specbeam.optimal_stopping import lambda_for_budget, optimal_cut, shrink_acceptance


def brute_force_cut(p: list[float], C: list[float], lam: float) -> int:
    """argmin over k of the stop cost sum(C[:k+1]) + λ (1 - prod p[:k+1]) (no loss at the target), earliest on
    ties; λ = inf allows only the target."""
    n = len(C)
    if lam == math.inf:
        return n - 1
    costs = [sum(C[: k + 1]) + (lam * (1 - math.prod(p[: k + 1])) if k < n - 1 else 0.0) for k in range(n)]
    return costs.index(min(costs))


def quantile_cost(p_rows: list[list[float]], C: list[float], lam: float, q: float) -> float:
    """The q-quantile over rows of the cost of stopping at each row's optimal cut."""
    return float(np.quantile([sum(C[: optimal_cut(row, C, lam) + 1]) for row in p_rows], q))


def random_case(rng: random.Random) -> tuple[list[float], list[float], float]:
    n = rng.randint(1, 6)
    p = [rng.choice([0.0, 1.0, rng.random()]) if rng.random() < 0.1 else rng.random() for _ in range(n)]
    C = [rng.choice([0.0, rng.expovariate(1.0)]) if rng.random() < 0.1 else rng.expovariate(1.0) for _ in range(n)]
    lam = rng.choice([0.0, math.inf, rng.expovariate(0.5), rng.uniform(0, 100)])
    return p, C, lam


def test_exported_from_the_package():
    assert specbeam.optimal_cut is optimal_cut and "optimal_cut" in specbeam.__all__


def test_equals_brute_force_on_random_cases():
    rng = random.Random(0)
    for _ in range(3000):
        p, C, lam = random_case(rng)
        assert optimal_cut(p, C, lam) == brute_force_cut(p, C, lam), (p, C, lam)


def test_equals_brute_force_with_exact_ties():
    """Dyadic p, integer C and λ: every sum and product is exact, so equal stop costs are really equal."""
    rng = random.Random(1)
    ties = 0
    for _ in range(3000):
        n = rng.randint(1, 5)
        p = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        C = [float(rng.randint(0, 3)) for _ in range(n)]
        lam = float(rng.randint(0, 8))
        cut = optimal_cut(p, C, lam)
        assert cut == brute_force_cut(p, C, lam), (p, C, lam)
        stop_cost = sum(C[: cut + 1]) + (lam * (1 - math.prod(p[: cut + 1])) if cut < n - 1 else 0.0)
        ties += any(stop_cost == sum(C[: k + 1]) + (lam * (1 - math.prod(p[: k + 1])) if k < n - 1 else 0.0)
                    for k in range(cut + 1, n))
    assert ties > 100  # the cases do exercise the earliest-on-ties rule


@pytest.mark.parametrize(
    "p, C, lam, expected",
    [
        ([0.3], [5.0], 0.0, 0),  # one stage: the target
        ([0.3], [5.0], math.inf, 0),
        ([0.9, 0.8, 1.0], [1.0, 2.0, 10.0], 0.0, 0),  # no price on loss: the cheapest stop
        ([0.9, 0.8, 1.0], [1.0, 2.0, 10.0], math.inf, 2),  # no loss allowed: the target
        ([1.0, 1.0, 1.0], [1.0, 2.0, 10.0], math.inf, 2),  # even when the drafts look certain
        ([0.5, 1.0], [1.0, 1.0], 2.0, 0),  # stop: 1 + 2 x 0.5 = 2 ties go on: 1 + 1 = 2, ties stop
        ([0.5, 1.0], [1.0, 1.0], 2.5, 1),  # 1 + 1.25 > 2: go on
        ([0.9, 0.5, 1.0], [1.0, 1.0, 100.0], 10.0, 0),  # 1 + 10 x 0.1 = 2 beats 2 + 10 x 0.55 and 102
    ],
)
def test_hand_computed_cuts(p, C, lam, expected):
    assert optimal_cut(p, C, lam) == expected


def test_accepts_lists_arrays_and_tensors():
    p, C = [0.9, 0.5, 1.0], [1.0, 1.0, 100.0]
    cuts = {optimal_cut(p, C, 10.0), optimal_cut(np.array(p), np.array(C), 10.0),
            optimal_cut(torch.tensor(p), torch.tensor(C, dtype=torch.float64), np.float64(10.0))}
    assert cuts == {0}


@pytest.mark.parametrize(
    "p, C, lam, name",
    [
        ([], [], 1.0, "empty stage list"),
        ([0.5, 0.5], [1.0], 1.0, "one entry per stage"),
        ([1.5, 0.5], [1.0, 1.0], 1.0, "p must lie in"),
        ([-0.1, 0.5], [1.0, 1.0], 1.0, "p must lie in"),
        ([math.nan, 0.5], [1.0, 1.0], 1.0, "p must lie in"),
        ([0.5, 0.5], [-1.0, 1.0], 1.0, "C must be finite"),
        ([0.5, 0.5], [math.inf, 1.0], 1.0, "C must be finite"),
        ([0.5, 0.5], [math.nan, 1.0], 1.0, "C must be finite"),
        ([0.5, 0.5], [1.0, 1.0], -1.0, "lam must be >= 0"),
        ([0.5, 0.5], [1.0, 1.0], math.nan, "lam must be >= 0"),
        ([[0.5, 0.5]], [1.0, 1.0], 1.0, "p must be 1-D"),
        (["a", 0.5], [1.0, 1.0], 1.0, "p must be numbers"),
    ],
)
def test_bad_input_raises_naming_the_argument(p, C, lam, name):
    with pytest.raises(ValueError, match=name):
        optimal_cut(p, C, lam)


# ---------------------------------------------------------------- shrinkage

def test_shrinkage_values():
    assert shrink_acceptance(0, 0, 2.0, 3.0) == pytest.approx(2 / 5)  # no data: the prior mean
    assert shrink_acceptance(8, 10, 1.0, 1.0) == pytest.approx(9 / 12)
    assert shrink_acceptance(800, 1000, 1.0, 1.0) == pytest.approx(801 / 1002)  # tends to p_hat = 0.8
    out = shrink_acceptance(torch.tensor([0.0, 5.0, 10.0]), torch.tensor([10.0, 10.0, 10.0]), 1.0, 3.0)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, torch.tensor([1 / 14, 6 / 14, 11 / 14]))
    out = shrink_acceptance(np.array([3, 4]), np.array([4, 4]), 0.5, 0.5)
    assert np.allclose(out, [3.5 / 5, 4.5 / 5])


@pytest.mark.parametrize(
    "accepted, proposed, alpha, beta, name",
    [(1, 2, 0.0, 1.0, "alpha"), (1, 2, 1.0, -1.0, "beta"), (1, 2, math.nan, 1.0, "alpha"),
     (1, 2, 1.0, math.inf, "beta"), (3, 2, 1.0, 1.0, "accepted <= proposed"), (-1, 2, 1.0, 1.0, "0 <= accepted")],
)
def test_shrinkage_bad_input(accepted, proposed, alpha, beta, name):
    with pytest.raises(ValueError, match=name):
        shrink_acceptance(accepted, proposed, alpha, beta)


# ---------------------------------------------------------------- λ for a budget

def random_rows(rng: random.Random, rows: int, n: int) -> list[list[float]]:
    return [[rng.uniform(0.05, 0.99) for _ in range(n)] for _ in range(rows)]


def test_quantile_cost_rises_with_lambda():
    rng = random.Random(2)
    for _ in range(20):
        n = rng.randint(2, 5)
        rows, C = random_rows(rng, 50, n), [rng.uniform(0.1, 3) for _ in range(n)]
        costs = [quantile_cost(rows, C, lam, 0.95) for lam in np.geomspace(1e-3, 1e4, 60)]
        assert costs == sorted(costs)
        assert quantile_cost(rows, C, math.inf, 0.95) >= costs[-1]


@pytest.mark.parametrize("q", [0.5, 0.95, 1.0])
def test_lambda_meets_the_budget_and_a_larger_one_does_not(q):
    rng = random.Random(3)
    for _ in range(15):
        n = rng.randint(2, 4)
        rows, C = random_rows(rng, 40, n), [rng.uniform(0.1, 3) for _ in range(n)]
        budget = rng.uniform(C[0], sum(C))
        lam = lambda_for_budget(rows, C, budget, q)
        assert 0 <= lam < math.inf
        assert quantile_cost(rows, C, lam, q) <= budget
        assert quantile_cost(rows, C, float(np.nextafter(lam, math.inf)), q) > budget


def test_lambda_for_a_budget_everyone_fits_is_inf_and_below_the_cheapest_raises():
    rows, C = [[0.5, 0.9, 1.0], [0.7, 0.2, 1.0]], [1.0, 2.0, 5.0]
    assert lambda_for_budget(rows, C, 8.0) == math.inf
    assert lambda_for_budget(torch.tensor(rows), np.array(C), 1.0) >= 0  # stage 0 for all fits exactly
    with pytest.raises(ValueError, match="below the cheapest possible cost"):
        lambda_for_budget(rows, C, 0.99)


@pytest.mark.parametrize(
    "rows, C, budget, q, name",
    [([0.5, 1.0], [1.0, 1.0], 1.5, 0.95, "p_rows must be 2-D"),
     (np.zeros((0, 2)), [1.0, 1.0], 1.5, 0.95, "at least one row"),
     ([[0.5, 1.0]], [1.0], 1.5, 0.95, "one entry per stage"),
     ([[1.5, 1.0]], [1.0, 1.0], 1.5, 0.95, "p_rows must lie in"),
     ([[0.5, 1.0]], [1.0, 1.0], 1.5, 0.0, "quantile"),
     ([[0.5, 1.0]], [1.0, 1.0], 1.5, 1.5, "quantile"),
     ([[0.5, 1.0]], [1.0, 1.0], math.nan, 0.95, "budget")],
)
def test_lambda_for_budget_bad_input(rows, C, budget, q, name):
    with pytest.raises(ValueError, match=name):
        lambda_for_budget(rows, C, budget, q)
