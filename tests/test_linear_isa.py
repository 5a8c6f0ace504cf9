"""csrc/kernels/linear.h compiled for each instruction set this CPU runs (the portable lanes, AVX2, AVX-512) gives
bitwise the bits of specbeam._C's linear, for every M from 1 to 33 and float32, bfloat16, float64 and int8 weights:
each build only picks which chains of fused multiply-adds run side by side (tests/linear_isa_driver.cpp)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from specbeam import linear_weight, ops
from specbeam.linear_weight import LinearWeight, pack_int8

DRIVER = Path(__file__).with_name("linear_isa_driver.cpp")
# (name, compiler flags, the /proc/cpuinfo flags it needs)
ISAS = [("portable", ["-mno-avx2", "-mno-fma"], []), ("avx2", ["-mavx2", "-mfma", "-mno-avx512f"], ["avx2", "fma"]),
        ("avx512", ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw"], ["avx2", "fma", "avx512f", "avx512bw"])]
DTYPES = {"f32": (torch.float32, torch.float32), "bf16": (torch.float32, torch.bfloat16),
          "f64": (torch.float64, torch.float64), "i8": (torch.float32, torch.int8)}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return set()


@pytest.fixture(scope="module", params=ISAS, ids=[isa[0] for isa in ISAS])
def driver(request, tmp_path_factory) -> Path:
    name, flags, needs = request.param
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler})")
    if not set(needs) <= cpu_flags():
        pytest.skip(f"this CPU does not run {name}")
    binary = tmp_path_factory.mktemp(name) / "linear"
    subprocess.run([compiler, "-O2", "-std=c++20", *flags, str(DRIVER), "-o", str(binary)], check=True)
    return binary


def run_driver(binary: Path, kind: str, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    m, k = x.shape
    n = packed.shape[0]  # (an int8 weight's bytes: its column scales, then its panels, as the driver reads them)
    payload = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (x, packed, bias) if t is not None)
    args = [str(binary), kind, str(m), str(k), str(n), str(int(bias is not None))]
    out = subprocess.run(args, input=payload, capture_output=True, check=True).stdout
    return torch.frombuffer(bytearray(out), dtype=x.dtype).view(m, n)


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("kind", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("k, n", [(37, 5), (200, 339), (130, 64)])
def test_every_instruction_set_gives_the_bits_of_the_build(backend, driver, kind, with_bias, k, n):
    dtype, weight_dtype = DTYPES[kind]
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(33, k, generator=gen, dtype=dtype)
    weight = torch.randn(n, k, generator=gen, dtype=dtype)
    bias = torch.randn(n, generator=gen, dtype=dtype) if with_bias else None
    weight = LinearWeight(weight, pack_int8(weight)) if weight_dtype == torch.int8 else weight.to(weight_dtype)
    packed = linear_weight.for_kernel(weight, dtype)
    for m in range(1, 34):
        expected = ops.linear(x[:m], weight, bias, backend=backend)
        assert torch.equal(run_driver(driver, kind, x[:m], packed, bias), expected), m
