"""Filtering and sampling: specbeam's ops (sorting-free on Triton and in C++) against the torch way, vLLM's sort-based
top-k / top-p fallback."""
import pytest
import torch

from specbeam import ops

SIZES = [(1, 32000), (8, 128256), (64, 128256)]  # (batch, vocab)
PARAMS = dict(temperature=0.8, top_k=50, top_p=0.9)


def sort_based_sample(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:  # [batch]
    """Sort each row, cut top-k and top-p on the sorted copy, scatter back, race exponentials."""
    ordered, order = (logits / temperature).sort(dim=-1)  # ascending
    ordered = ordered.masked_fill(ordered < ordered[:, -top_k, None], float("-inf"))
    cut = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    cut[:, -1] = False  # keep at least one
    ordered = ordered.masked_fill(cut, float("-inf"))
    probs = ordered.scatter(1, order, ordered).softmax(dim=-1)
    return probs.div(torch.empty_like(probs).exponential_()).argmax(dim=-1)


@pytest.mark.parametrize("batch, vocab", SIZES)
def test_sample(timed, backend, device, batch, vocab):
    logits = torch.randn(batch, vocab, device=device)
    timed(f"sample b{batch} v{vocab}", ops.sample, logits, **PARAMS, backend=backend)


@pytest.mark.parametrize("batch, vocab", SIZES)
def test_sort_based_sample(timed, device, batch, vocab):
    logits = torch.randn(batch, vocab, device=device)
    timed(f"sample b{batch} v{vocab}", sort_based_sample, logits, **PARAMS)


@pytest.mark.parametrize("batch, vocab", SIZES)
def test_filter_probs(timed, backend, device, batch, vocab):
    logits = torch.randn(batch, vocab, device=device)
    timed(f"filter b{batch} v{vocab}", ops.filter_probs, logits, **PARAMS, min_p=0.05, backend=backend)
