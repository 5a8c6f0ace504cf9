"""Temperature, top-k, top-p and min-p filtering and inverse-CDF sampling, in plain torch.

The warpers follow transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` and
`MinPLogitsWarper`, applied in that order with `min_tokens_to_keep=1` (the sampling case). Each keeps a top
set of tokens by scaled logit; a parameter at its neutral value (top_k 0, top_p 1, min_p 0) leaves the row as
it is. Temperature 0 means greedy: the row keeps only its first argmax, as `torch.argmax` picks it.

Ties. A tie at a threshold keeps the whole tied group:
- top-k keeps every token whose logit is >= the k-th largest (exactly transformers);
- min-p keeps every token whose probability is >= min_p * max probability (exactly transformers);
- top-p keeps token x iff the mass of tokens with a strictly larger logit is < top_p. transformers keeps
  whichever part of a tied group its (unstable) sort happens to put last; the rule here keeps the group of the
  lowest token transformers keeps, whole, whatever the sort order. Off ties the two agree. top_p = 0
  keeps the top tied group (transformers' min_tokens_to_keep=1, widened to its ties).

Noise. `sample` takes one uniform u in [0, 1) per row and returns the first token whose cumulative
probability exceeds u * total (inverse CDF over the kept tokens in vocabulary order).
"""
import torch


def sampling_params(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: float | torch.Tensor,  # scalar or [batch]
    top_k: int | torch.Tensor,  # scalar or [batch]
    top_p: float | torch.Tensor,  # scalar or [batch]
    min_p: float | torch.Tensor,  # scalar or [batch]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # four [batch] tensors
    """Check the parameters and broadcast each to one value per row (float32, int64, float32, float32)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [batch, vocab] tensor, got {logits.dtype} {tuple(logits.shape)}")
    batch, device = logits.shape[0], logits.device
    rows = {}
    for name, value, dtype, low, high in (
        ("temperature", temperature, torch.float32, 0.0, float("inf")),
        ("top_k", top_k, torch.int64, 0, float("inf")),
        ("top_p", top_p, torch.float32, 0.0, 1.0),
        ("min_p", min_p, torch.float32, 0.0, 1.0),
    ):
        if isinstance(value, (int, float)):  # (checked without making a tensor first: the common case)
            if not low <= value <= high:
                raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
            rows[name] = torch.full((batch,), value, dtype=dtype, device=device)
            continue
        row = torch.as_tensor(value, dtype=dtype, device=device)
        if row.dim() > 1 or (row.dim() == 1 and row.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or a [{batch}] tensor, got shape {tuple(row.shape)}")
        if not bool(((row >= low) & (row <= high)).all()):
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
        rows[name] = row.expand(batch).contiguous()
    return rows["temperature"], rows["top_k"], rows["top_p"], rows["min_p"]


def _top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:  # [batch, vocab], [batch]
    vocab = scores.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # 0: keep all
    kth = scores.sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:  # [batch, vocab], [batch]
    ordered = scores.sort(dim=1, descending=True).values
    probs = ordered.softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs  # mass of the tokens ranked before each
    # the lowest kept logit: the last rank whose mass before it is < top_p; its whole tie group stays
    last = ((mass_before < top_p[:, None]).sum(dim=1) - 1).clamp(min=0)
    threshold = ordered.gather(1, last[:, None])
    threshold = torch.where(top_p[:, None] < 1, threshold, float("-inf"))  # 1: keep all
    return scores.masked_fill(scores < threshold, float("-inf"))


def _min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:  # [batch, vocab], [batch]
    probs = scores.softmax(dim=1)
    too_small = probs < min_p[:, None] * probs.amax(dim=1, keepdim=True)
    return scores.masked_fill(too_small, float("-inf"))


def filter_probs(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: float | torch.Tensor = 1.0,  # scalar or [batch]; 0: greedy
    top_k: int | torch.Tensor = 0,  # scalar or [batch]; 0: off
    top_p: float | torch.Tensor = 1.0,  # scalar or [batch]; 1: off
    min_p: float | torch.Tensor = 0.0,  # scalar or [batch]; 0: off
) -> torch.Tensor:  # [batch, vocab] float32 (float64 for float64 logits)
    """The renormalised distribution that transformers' warpers leave (see the module docstring)."""
    temperature, top_k, top_p, min_p = sampling_params(logits, temperature, top_k, top_p, min_p)
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    greedy = temperature == 0
    scores = scores / torch.where(greedy, 1.0, temperature)[:, None]
    scores = _min_p(_top_p(_top_k(scores, top_k), top_p), min_p)
    first_max = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).bool()
    scores = torch.where(greedy[:, None] & ~first_max, float("-inf"), scores)
    return scores.softmax(dim=1)


def inverse_cdf(
    weights: torch.Tensor,  # [batch, vocab] non-negative, not necessarily normalised
    uniform: torch.Tensor,  # [batch] in [0, 1)
) -> torch.Tensor:  # [batch] int64
    """The first token whose cumulative weight exceeds u * total; the last positive one if rounding runs out."""
    cdf = weights.cumsum(dim=1)
    threshold = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, threshold, right=True)[:, 0]
    positions = torch.arange(weights.shape[1], device=weights.device)
    last_positive = torch.where(weights > 0, positions, -1).amax(dim=1)
    return torch.minimum(token, last_positive)


def sample(
    logits: torch.Tensor,  # [batch, vocab]
    noise: torch.Tensor,  # [batch] uniform in [0, 1)
    temperature: float | torch.Tensor = 1.0,  # scalar or [batch]; 0: argmax
    top_k: int | torch.Tensor = 0,  # scalar or [batch]
    top_p: float | torch.Tensor = 1.0,  # scalar or [batch]
    min_p: float | torch.Tensor = 0.0,  # scalar or [batch]
) -> torch.Tensor:  # [batch] int64
    """One token per row from `filter_probs`, by inverse CDF on `noise`."""
    probs = filter_probs(logits, temperature, top_k, top_p, min_p)
    return inverse_cdf(probs, noise)
