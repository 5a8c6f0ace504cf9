"""Shared by the benchmarks: the device, the backends (Triton on CUDA only) and a synchronising timer."""
import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=["reference", "triton"])
def backend(request) -> str:
    if request.param == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton is timed on CUDA only: on the CPU it would time its interpreter")
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
