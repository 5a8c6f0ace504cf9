"""linear for the few rows of a decode step or a draft tree, over every matrix of a 5-layer model (hidden 384,
K/V projections 128 wide, intermediate 896, vocab 4096): 35 MB of float32 weights, more than the caches hold,
so each round streams them from memory as a decode forward does. The C++ kernel reads them packed once, as the
engine does (`specbeam.linear_weight.prepare`), and is also timed on bfloat16-exact weights, which it packs in
bfloat16 (widened exactly as loaded: half the bytes to stream)."""
import functools

import pytest
import torch

from models import DEVICE
from specbeam import ops
from specbeam.linear_weight import for_torch, prepare

ROWS = [1, 4, 9, 16]  # one token, and draft trees
LAYER = [(384, 384), (128, 384), (128, 384), (384, 384), (896, 384), (896, 384), (384, 896)]  # q k v o gate up down


@functools.cache
def weights() -> list[torch.Tensor]:  # [out, in] each, as nn.Linear holds them
    gen = torch.Generator().manual_seed(0)
    shapes = LAYER * 5 + [(4096, 384)]  # + lm_head
    return [torch.randn(*shape, generator=gen).div(shape[1] ** 0.5).to(DEVICE) for shape in shapes]


def inputs(rows: int) -> dict[int, torch.Tensor]:  # x [rows, in] per input width
    return {k: torch.randn(rows, k, device=DEVICE) for k in (384, 896)}


def every_matrix(x, mats, **kwargs):
    for w in mats:
        ops.linear(x[for_torch(w).shape[1]], w, **kwargs)


@pytest.mark.parametrize("rows", ROWS)
def test_linear(timed, backend, rows):
    if backend == "triton":
        pytest.skip("linear has no Triton kernel: CUDA tensors get torch's F.linear, the reference")
    mats = [prepare(w, cpp_kernel=True) for w in weights()] if backend == "cpp" else weights()
    timed(f"linear m{rows}", every_matrix, inputs(rows), mats, backend=backend)


@functools.cache
def bfloat16_weights() -> list:  # float32 weights that bfloat16 holds exactly, prepared: packed in bfloat16
    return [prepare(w.to(torch.bfloat16).float(), cpp_kernel=True) for w in weights()]


@pytest.mark.parametrize("rows", ROWS)
def test_linear_bfloat16_weights(timed, backend, rows):
    if backend != "cpp":
        pytest.skip("only the C++ kernel reads bfloat16 weights as they are")
    timed(f"linear m{rows}", every_matrix, inputs(rows), bfloat16_weights(), backend=backend)


@pytest.mark.parametrize("rows", ROWS)
def test_pretransposed_matmul(timed, rows):
    """torch's best on the CPU, x @ W.T with W.T made contiguous once: a copy of every weight."""
    transposed = [w.T.contiguous() for w in weights()]
    x = inputs(rows)
    timed(f"linear m{rows}", lambda: [x[t.shape[0]] @ t for t in transposed])
