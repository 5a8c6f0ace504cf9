"""A linear layer's weight in the form each backend reads: nn.Linear's [N, K] for torch, and for the C++ kernel
the same elements packed into column panels (csrc/kernels/linear.h), from bfloat16 where that is exact, or a
draft's weight quantized to int8 per output column with its column scales.

Packed layout of weight [N, K], P = 16 columns per panel (8 for float64): the N // P panels [K, P], panel p
row k holding weight[p * P + c, k] for c = 0 .. P - 1, then the N % P last columns as one tail [K, N % P];
N * K elements in all, returned as an [N, K] tensor. A bfloat16 panel row stores its columns in the order
0, 8, 1, 9, ..., 7, 15, so that each 32-bit word holds columns l and l + 8 (the kernel widens both with one
shift and one mask)."""
from dataclasses import dataclass

import torch

BFLOAT16_ORDER = [c for pair in zip(range(8), range(8, 16)) for c in pair]  # 0, 8, 1, 9, ..., 7, 15
KERNEL_FLOATS = (torch.float32, torch.float64)  # the dtypes of x (and of the sums) the C++ kernel takes


@dataclass(frozen=True)
class LinearWeight:
    weight: torch.Tensor  # [N, K] as nn.Linear holds it: what the torch backends read
    packed: torch.Tensor | None  # [N, K] elements in the C++ kernel's layout; None where the kernel is not used


def kernel_takes(x: torch.dtype, weight: torch.dtype) -> bool:
    """The dtypes the C++ linear takes, as csrc/linear.cpp checks them: x and weight alike in float32 / float64,
    or a bfloat16 weight under float32 x."""
    return x in KERNEL_FLOATS and (weight == x or (x == torch.float32 and weight == torch.bfloat16))


def panel_columns(dtype: torch.dtype) -> int:
    """Columns per panel: two 256-bit registers of the sums' float type."""
    return 8 if dtype == torch.float64 else 16


def pack(weight: torch.Tensor) -> torch.Tensor:  # [N, K] -> [N, K] packed
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    p = panel_columns(weight.dtype)
    full = n // p * p
    panels = weight[:full].reshape(n // p, p, k).transpose(1, 2)  # [N // P, K, P]
    if weight.dtype == torch.bfloat16:
        panels = panels[..., BFLOAT16_ORDER]
    tail = weight[full:].T  # [K, N % P]
    return torch.cat([panels.reshape(-1), tail.reshape(-1)]).view(n, k)


def bfloat16_if_exact(weight: torch.Tensor) -> torch.Tensor:
    """The weight's bfloat16 copy where that changes no result of the C++ kernel, else the weight itself.

    Lossless: the copy is taken only for a float32 weight whose every element survives the round trip through
    bfloat16 bit for bit (as in a model stored in bfloat16 and upcast at load); the kernel widens each element
    back to exactly that float32 and runs the same fused multiply-adds: the same bits out, from half the bytes."""
    if weight.dtype != torch.float32:
        return weight
    compact = weight.detach().to(torch.bfloat16)
    same_bits = torch.equal(compact.float().view(torch.int32), weight.detach().view(torch.int32))
    return compact if same_bits else weight


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [N, K] -> q [N, K], scale [N]
    """Per output column (a row of nn.Linear's weight): weight[j, k] ~ scale[j] * q[j, k], with
    scale[j] = max_k |weight[j, k]| / 127 (1 for a zero row) and q = round(weight / scale) in [-127, 127]."""
    w = weight.detach().float()
    top = w.abs().amax(1)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def pack_int8(weight: torch.Tensor) -> torch.Tensor:  # [N, K] float -> [N, K + 4] int8
    """What the C++ kernel reads of an int8-quantized weight: the N float32 column scales' bytes, then q packed."""
    q, scale = quantize_int8(weight)
    n, k = q.shape
    return torch.cat([scale.view(torch.int8), pack(q).reshape(-1)]).view(n, k + 4)


def read_as(weight: torch.Tensor, weights: str | None) -> torch.Tensor:  # [N, K] -> [N, K] in weight's dtype
    """The weight a model computes with when its weights are read as stored (None), rounded to bfloat16
    ("bfloat16") or quantized to int8 per output column ("int8"): a copy where it changes anything."""
    if weights == "bfloat16":
        return weight.detach().to(torch.bfloat16).to(weight.dtype)
    if weights == "int8":
        q, scale = quantize_int8(weight)
        return (q.float() * scale[:, None]).to(weight.dtype)
    return weight


def for_cpp(weight: torch.Tensor, weights: str | None = None) -> torch.Tensor:  # [N, K] -> [N, K] packed
    """The copy the C++ kernel reads: packed, from bfloat16 where that is exact; under `weights="int8"` a float32
    weight's int8 form ([N, K + 4], `pack_int8`), whose scaled sums equal `read_as`'s up to rounding."""
    if weights == "int8" and weight.dtype == torch.float32:
        return pack_int8(weight)
    return pack(bfloat16_if_exact(read_as(weight.detach(), weights)))


def prepare(weight: torch.Tensor, cpp_kernel: bool) -> LinearWeight:
    """weight [N, K] for every backend: packed (`for_cpp`) when the C++ kernel is built and takes a CPU weight
    of this dtype (float32 / float64), once, at load time."""
    takes = cpp_kernel and weight.device.type == "cpu" and kernel_takes(weight.dtype, weight.dtype)
    return LinearWeight(weight, for_cpp(weight) if takes else None)


def for_torch(weight: "torch.Tensor | LinearWeight") -> torch.Tensor:  # [N, K]
    return weight.weight if isinstance(weight, LinearWeight) else weight


def for_kernel(weight: "torch.Tensor | LinearWeight", x: torch.dtype) -> torch.Tensor:  # [N, K]
    """What the C++ ops take for a weight under x: packed when the kernel takes the pair (packed now if it came
    unpacked), else nn.Linear's layout, which the decoder layer halves hand to ATen."""
    if isinstance(weight, LinearWeight):
        return weight.packed if weight.packed is not None else weight.weight
    return pack(weight.detach()) if kernel_takes(x, weight.dtype) else weight
