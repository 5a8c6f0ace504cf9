"""Triton runs through its CPU interpreter unless TRITON_INTERPRET is set otherwise (before triton is imported);
C++ cases skip when specbeam._C is not built."""
import os

import pytest
import torch
from scipy.stats import chisquare

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def skip_cpp_unless_built(request):
    """A test parametrized with backend="cpp" is skipped, saying why, when specbeam._C is not built."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cpp":
        from specbeam import ops

        module, reason = ops._load_cpp()
        if module is None:
            pytest.skip(reason)
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip("the C++ backend takes CPU tensors, and this run puts them on the GPU")


@pytest.fixture
def device() -> torch.device:
    """Where the tensors of a test live: the GPU when Triton compiles for real, the CPU under the interpreter."""
    return torch.device("cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda")


@pytest.fixture
def fit_pvalue():
    """p-value of a chi-square goodness of fit of counts [n] to probabilities [n] that may hold zeros;
    0 when a count falls where the probability is zero."""

    def pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
        counts, probs = counts.double().cpu(), probs.double().cpu()
        if counts[probs == 0].sum() > 0:
            return 0.0
        support = probs > 0
        expected = probs[support] / probs[support].sum() * counts.sum()
        return chisquare(counts[support], expected).pvalue

    return pvalue
