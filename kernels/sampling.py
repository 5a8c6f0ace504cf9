"""Temperature, top-k, top-p and min-p filtering and sampling in one Triton kernel, without a sort.

One program per row. Each threshold is found by bisection on an integer key that orders the scaled logits,
counting the tokens (top-k) or summing the probability mass (top-p) at or above the candidate key: one pass
over the vocabulary per step, at most 32 steps (about log2(vocab) in practice, as each step also narrows the
interval to the nearest tokens' keys), and an exact answer with no tolerance to tune. Semantics (ties
included) and the noise convention are those of `specbeam.reference.sampling`.
"""
import torch
import triton
import triton.language as tl

from specbeam.reference.sampling import sampling_params

KEY_NEG_INF = tl.constexpr(-2139095041)  # the key of -inf: every real score has a key >= this
KEY_NONE = tl.constexpr(-2147483648)  # key of the padding lanes past the vocabulary: below every real key
KEY_MAX = tl.constexpr(2147483647)


@triton.jit
def _load_scaled(row_ptr, start, vocab, temperature, BLOCK: tl.constexpr):
    """Indices, scaled scores and keys of one chunk of a row. Keys are int32 whose signed order is the order
    of the float32 scores (-0.0 and +0.0 share one); lanes past the vocabulary get KEY_NONE."""
    idx = start + tl.arange(0, BLOCK)
    inside = idx < vocab
    scores = tl.load(row_ptr + idx, mask=inside, other=float("-inf")).to(tl.float32) / temperature
    bits = tl.where(scores == 0, 0.0, scores).to(tl.int32, bitcast=True)
    # negative floats: flip the magnitude bits, so that a larger magnitude gives a lower key
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return idx, scores, tl.where(inside, key, KEY_NONE)


@triton.jit
def _row_max(row_ptr, vocab, temperature, BLOCK: tl.constexpr):
    """The largest scaled score of a row, its key, and the first index that holds it."""
    best = float("-inf")
    best_key = KEY_NONE
    first = 0
    for start in range(0, vocab, BLOCK):
        idx, scores, key = _load_scaled(row_ptr, start, vocab, temperature, BLOCK)
        chunk_best = tl.max(scores, axis=0)
        chunk_first = tl.min(tl.where(scores == chunk_best, idx, vocab), axis=0)
        first = tl.where(chunk_best > best, chunk_first, first)  # earlier chunks win ties
        best = tl.maximum(best, chunk_best)
        best_key = tl.maximum(best_key, tl.max(key, axis=0))
    return best, best_key, first


@triton.jit
def _mass_from(row_ptr, vocab, temperature, key_floor, max_score, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Number (COUNT) or unnormalised probability mass exp(score - max) of the tokens with key >= key_floor;
    also the lowest key at or above key_floor and the highest key below it."""
    total = 0.0
    up = KEY_MAX
    down = KEY_NONE
    for start in range(0, vocab, BLOCK):
        _, scores, key = _load_scaled(row_ptr, start, vocab, temperature, BLOCK)
        above = key >= key_floor
        if COUNT:
            total += tl.sum(above.to(tl.float32), axis=0)
        else:
            total += tl.sum(tl.where(above, tl.exp(scores - max_score), 0.0), axis=0)
        up = tl.minimum(up, tl.min(tl.where(above, key, KEY_MAX), axis=0))
        down = tl.maximum(down, tl.max(tl.where(above, KEY_NONE, key), axis=0))
    return total, up, down


@triton.jit
def _largest_key_reaching(
    row_ptr, vocab, temperature, lo, hi, target, max_score, COUNT: tl.constexpr, BLOCK: tl.constexpr
):
    """The largest key t in [lo, hi] with mass(key >= t) >= target, given that mass(key >= lo) >= target.

    The mass is a step function of t that falls just past each token's key, so the answer is a token's key:
    the lowest one that the filter keeps, ties included. Each step halves [lo, hi] and then narrows it to the
    nearest tokens' keys, so it ends once no token lies strictly inside."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        mass, up, down = _mass_from(row_ptr, vocab, temperature, mid, max_score, COUNT, BLOCK)
        reached = mass >= target
        lo = tl.where(reached, up, lo)  # the mass at `up` equals the mass at `mid`
        hi = tl.where(reached, hi, down)  # the answer is a token's key below mid
    return lo


@triton.jit
def _kept_weights(scores, key, idx, max_score, key_floor, min_p, greedy, first_max):
    """exp(score - max) where a token survives every filter, else 0."""
    weights = tl.exp(scores - max_score)
    # min-p: p(x) >= min_p * p(top)  <=>  exp(score - max) >= min_p
    kept = (key >= key_floor) & (weights >= min_p)
    kept = tl.where(greedy, idx == first_max, kept)
    return tl.where(kept, weights, 0.0)


@triton.jit
def _cdf_step(weights, idx, threshold, running, token, last):
    """One chunk of inverse-CDF sampling: the first index whose cumulative weight exceeds threshold so far
    (token), the last index with positive weight (last), and the running total."""
    cdf = running + tl.cumsum(weights, axis=0)
    token = tl.minimum(token, tl.min(tl.where(cdf > threshold, idx, token), axis=0))
    last = tl.maximum(last, tl.max(tl.where(weights > 0, idx, -1), axis=0))
    return tl.max(cdf, axis=0), token, last


@triton.jit
def _sampling_kernel(
    logits_ptr,  # [batch, vocab]
    row_stride,
    temperature_ptr,  # [batch] float32
    top_k_ptr,  # [batch] int64
    top_p_ptr,  # [batch] float32
    min_p_ptr,  # [batch] float32
    noise_ptr,  # [batch] float32 uniform in [0, 1) (SAMPLE only)
    out_ptr,  # [batch, vocab] float32 probabilities, or [batch] int64 tokens (SAMPLE)
    vocab,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0
    temperature = tl.where(greedy, 1.0, temperature)
    max_score, top_key, first_max = _row_max(row_ptr, vocab, temperature, BLOCK)

    # top-k: keep the scores >= the k-th largest (0 or >= vocab: off)
    key_floor = tl.full([], KEY_NEG_INF, tl.int64)
    top_k = tl.load(top_k_ptr + row)
    if (top_k > 0) & (top_k < vocab):
        key_floor = _largest_key_reaching(
            row_ptr, vocab, temperature, key_floor, top_key, top_k.to(tl.float32), max_score, True, BLOCK
        )

    # top-p: keep x iff the mass strictly above score(x) is < top_p, i.e. down to the first key
    # at which the mass at or above reaches top_p (1: off)
    top_p = tl.load(top_p_ptr + row)
    if top_p < 1:
        kept_mass, _, _ = _mass_from(row_ptr, vocab, temperature, key_floor, max_score, False, BLOCK)
        key_floor = _largest_key_reaching(
            row_ptr, vocab, temperature, key_floor, top_key, top_p * kept_mass, max_score, False, BLOCK
        )

    # min-p and the total mass of what is kept
    min_p = tl.load(min_p_ptr + row)
    total = 0.0
    for start in range(0, vocab, BLOCK):
        idx, scores, key = _load_scaled(row_ptr, start, vocab, temperature, BLOCK)
        total += tl.sum(_kept_weights(scores, key, idx, max_score, key_floor, min_p, greedy, first_max), axis=0)

    if SAMPLE:
        threshold = tl.load(noise_ptr + row) * total
        running = 0.0
        token = vocab
        last = -1
        for start in range(0, vocab, BLOCK):
            idx, scores, key = _load_scaled(row_ptr, start, vocab, temperature, BLOCK)
            weights = _kept_weights(scores, key, idx, max_score, key_floor, min_p, greedy, first_max)
            running, token, last = _cdf_step(weights, idx, threshold, running, token, last)
        tl.store(out_ptr + row, tl.minimum(token, last).to(tl.int64))
    else:
        for start in range(0, vocab, BLOCK):
            idx, scores, key = _load_scaled(row_ptr, start, vocab, temperature, BLOCK)
            weights = _kept_weights(scores, key, idx, max_score, key_floor, min_p, greedy, first_max)
            tl.store(out_ptr + row.to(tl.int64) * vocab + idx, weights / total, mask=idx < vocab)


def _launch(logits, noise, temperature, top_k, top_p, min_p, sample):
    params = sampling_params(logits, temperature, top_k, top_p, min_p)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    batch, vocab = logits.shape
    if sample:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    else:
        out = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    block = min(4096, triton.next_power_of_2(vocab))
    _sampling_kernel[(batch,)](
        logits, logits.stride(0), *params, noise, out, vocab, SAMPLE=sample, BLOCK=block, num_warps=8
    )
    return out


def filter_probs(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: float | torch.Tensor = 1.0,  # scalar or [batch]; 0: greedy
    top_k: int | torch.Tensor = 0,  # scalar or [batch]; 0: off
    top_p: float | torch.Tensor = 1.0,  # scalar or [batch]; 1: off
    min_p: float | torch.Tensor = 0.0,  # scalar or [batch]; 0: off
) -> torch.Tensor:  # [batch, vocab] float32
    """The renormalised distribution that transformers' warpers leave; see `specbeam.reference.sampling`."""
    return _launch(logits, None, temperature, top_k, top_p, min_p, sample=False)


def sample(
    logits: torch.Tensor,  # [batch, vocab]
    noise: torch.Tensor,  # [batch] uniform in [0, 1)
    temperature: float | torch.Tensor = 1.0,  # scalar or [batch]; 0: argmax
    top_k: int | torch.Tensor = 0,  # scalar or [batch]
    top_p: float | torch.Tensor = 1.0,  # scalar or [batch]
    min_p: float | torch.Tensor = 0.0,  # scalar or [batch]
) -> torch.Tensor:  # [batch] int64
    """One token per row from `filter_probs`, by inverse CDF on `noise`."""
    return _launch(logits, noise.to(torch.float32).contiguous(), temperature, top_k, top_p, min_p, sample=True)
