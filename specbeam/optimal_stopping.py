"""Where a cascade of stages should stop: the optimal-stopping DP, Beta-shrunk acceptance, and λ for a budget.

Stages 0..n-1 run in order; the last one is the target. Stage i costs C[i] and its output is accepted by the
stages above it with probability p[i], so stopping after stage k < n-1 loses quality with probability
1 - prod(p[:k+1]); stopping at the target loses none. With a price λ on lost quality, stopping at k costs

    S[k] = sum(C[:k+1]) + λ (1 - prod(p[:k+1]))     (k < n-1),      S[n-1] = sum(C),

and the DP over the cost-to-go J (C[i] is paid on reaching stage i, whatever is decided there)

    J[n-1] = C[n-1],    J[i] = min( C[i] + λ (1 - prod p[:i+1]),  C[i] + J[i+1] )

stops at the first stage whose stopping term wins (ties: stop). J[i] = min_{k>=i} S[k] - sum(C[:i]), so
stopping wins at i exactly when S[i] <= min_{k>i} S[k]: the stage chosen is the earliest argmin of S.

λ = 0 prices no loss: stage 0 (the cheapest stop, costs being >= 0). λ = inf forbids any loss: the target.
"""
import math
from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[Sequence[float], np.ndarray, torch.Tensor]


# ---------------------------------------------------------------- input checks

def _as_float64(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers, got {x!r}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    return array


def _check_stages(p: np.ndarray, C: np.ndarray, p_name: str) -> None:
    """p: [..., n] acceptances in [0, 1]; C: [n] finite costs >= 0; n >= 1."""
    if C.shape[0] == 0:
        raise ValueError("C must list at least one stage (the target), got an empty stage list")
    if p.shape[-1] != C.shape[0]:
        raise ValueError(f"{p_name} and C must have one entry per stage, got {p.shape[-1]} and {C.shape[0]}")
    if not np.all((p >= 0) & (p <= 1)):  # NaN fails too
        raise ValueError(f"{p_name} must lie in [0, 1], got {p.tolist()}")
    if not np.all(np.isfinite(C) & (C >= 0)):
        raise ValueError(f"C must be finite and >= 0, got {C.tolist()}")


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not lam >= 0:  # NaN fails too
        raise ValueError(f"lam must be >= 0 (inf allowed: never stop before the target), got {lam}")
    return lam


# ---------------------------------------------------------------- the DP

def _cuts(
    p: np.ndarray,  # [R, n] float64, one row of stage acceptances per request
    C: np.ndarray,  # [n] float64 stage costs
    lam: float,
) -> np.ndarray:  # [R] int64: the stage each row stops at
    """The DP of the module docstring, run backwards over the stages for all rows at once; inputs checked."""
    rows, n = p.shape
    cut = np.full(rows, n - 1, dtype=np.int64)
    if math.isinf(lam):
        return cut
    loss = lam * (1.0 - np.cumprod(p, axis=1))  # [R, n]: λ (1 - prod p[:i+1])
    J = np.full(rows, C[n - 1])  # J[n-1] = C[n-1]
    for i in range(n - 2, -1, -1):
        stop, go = C[i] + loss[:, i], C[i] + J
        cut = np.where(stop <= go, i, cut)  # going backwards, the last overwrite is the earliest stop
        J = np.minimum(stop, go)
    return cut


def optimal_cut(p: ArrayLike, C: ArrayLike, lam: float) -> int:
    """The stage to stop at: the earliest i where stopping is optimal (n - 1, the target, when none is).

    p: [n] acceptance of each stage (p[n-1], the target's, is checked but never used); C: [n] cost of each
    stage; lam: the price of one unit of expected quality loss, >= 0, inf allowed."""
    p, C = _as_float64(p, "p", 1), _as_float64(C, "C", 1)
    _check_stages(p, C, "p")
    return int(_cuts(p[None], C, _check_lam(lam))[0])


# ---------------------------------------------------------------- acceptance estimates

def shrink_acceptance(accepted, proposed, alpha: float, beta: float):
    """Beta(alpha, beta)-prior estimate of an acceptance rate, elementwise:

        p = (n p_hat + alpha) / (n + alpha + beta) = (accepted + alpha) / (proposed + alpha + beta),

    n = proposed tokens, n p_hat = accepted ones. With no data it is the prior mean alpha / (alpha + beta); it
    tends to p_hat as n grows. accepted and proposed: numbers, numpy arrays or tensors of one shape (the
    result has their type)."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    a, n = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (accepted, proposed))
    if not np.all((a >= 0) & (a <= n)):  # NaN fails too
        raise ValueError(f"need 0 <= accepted <= proposed elementwise, got {a.tolist()} and {n.tolist()}")
    return (accepted + alpha) / (proposed + alpha + beta)


# ---------------------------------------------------------------- λ for a latency budget

def _quantile_cost(p_rows: np.ndarray, C: np.ndarray, lam: float, quantile: float) -> float:
    """p_rows: [R, n]; the `quantile` of the rows' stop costs sum(C[:k+1]), k = the row's optimal cut."""
    return float(np.quantile(np.cumsum(C)[_cuts(p_rows, C, lam)], quantile))


def lambda_for_budget(p_rows: ArrayLike, C: ArrayLike, budget: float, quantile: float = 0.95) -> float:
    """The largest λ whose per-request costs have their `quantile` (numpy's linear one) <= budget.

    p_rows: [R, n] predicted stage acceptances, one row per request; C: [n] stage costs; budget: in C's unit.
    inf when every request may go to the target. Raises ValueError when the budget is below C[0], the
    cheapest possible cost (λ = 0 stops every request at stage 0).

    Why a binary search works: the quantile cost rises with λ. S_λ[k] = A[k] + λ B[k], with A[k] =
    sum(C[:k+1]) non-decreasing and B[k] = 1 - prod p[:k+1] non-increasing in k. Let k be the earliest argmin
    at λ and λ' > λ. Any j < k has A[j] + λ B[j] > A[k] + λ B[k], and B[j] >= B[k], so adding (λ' - λ) B[j] >=
    (λ' - λ) B[k] keeps j worse than k at λ': the cut never moves down, so its cost A[cut] never falls, nor does
    any quantile of the costs. (λ = inf, the target, is the most expensive cut.)"""
    p_rows, C = _as_float64(p_rows, "p_rows", 2), _as_float64(C, "C", 1)
    _check_stages(p_rows, C, "p_rows")
    if p_rows.shape[0] == 0:
        raise ValueError("p_rows must have at least one row (request)")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    if math.isnan(budget):
        raise ValueError("budget must be a number, got nan")
    if _quantile_cost(p_rows, C, 0.0, quantile) > budget:
        raise ValueError(f"budget {budget} is below the cheapest possible cost, C[0] = {C[0]}")
    if _quantile_cost(p_rows, C, math.inf, quantile) <= budget:
        return math.inf
    return _bisect_lambda(lambda lam: _quantile_cost(p_rows, C, lam, quantile) <= budget)


def _bisect_lambda(fits) -> float:
    """The largest finite float λ >= 0 with fits(λ), fits being true at 0 and monotone (true, then false).

    Non-negative float64 values are ordered like their bit patterns read as int64, so bisecting the integers
    ends on two adjacent floats, lo fitting and the next one not, in at most 64 steps."""
    lo, hi = _bits(0.0), _bits(np.finfo(np.float64).max)
    if fits(_from_bits(hi)):
        return _from_bits(hi)  # some row's drafts are accepted surely (prod p = 1): every finite λ fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(_from_bits(mid)) else (lo, mid)
    return _from_bits(lo)


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


def _from_bits(i: int) -> float:
    return float(np.int64(i).view(np.float64))
