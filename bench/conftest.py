"""Shared by the benchmarks: the device, the backends (Triton on CUDA only, C++ on the CPU only) and a
synchronising timer."""
import pytest
import torch

from models import DEVICE
from specbeam import ops


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=["reference", "triton", "cpp"])
def backend(request) -> str:
    if request.param == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton is timed on CUDA only: on the CPU it would time its interpreter")
    if request.param == "cpp":
        module, reason = ops._load_cpp()
        if module is None or DEVICE.type != "cpu":
            pytest.skip(reason if module is None else "the C++ backend is timed on the CPU only")
    return request.param


@pytest.fixture
def timed(benchmark):
    """timed(group, fn, *args): time fn after one warm-up call (where Triton compiles), syncing the device."""

    def run(group, fn, *args, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.group = group
        return benchmark.pedantic(call, warmup_rounds=1, rounds=10)

    return run
