"""The two halves of a Llama-family decoder layer around its attention, as transformers computes them, op
for op (the C++ backend computes the same maths with its own loops and linear kernel: equal to float
tolerance, and batch invariant):

    attention_inputs: x = rmsnorm(h); q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv; q, k = rope(q), rope(k)
    mlp_block:        h = h + a Wo^T (+ bo); x = rmsnorm(h); h = h + (silu(x Wg^T) * (x Wu^T)) Wd^T
"""
import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [T, K] -> [T, N]
    """x W^T + b, weight [N, K] as nn.Linear holds it: the head, under the name the C++ module gives it."""
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # x [T, H], weight [H]
    """w * (x / sqrt(mean(x^2) + eps)), the statistics in float32."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [T, H, D]; cos, sin [T, D]
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) for x = (x1, x2) split in halves."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention_inputs(
    hidden: torch.Tensor,  # [T, H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    q_weight: torch.Tensor, q_bias: torch.Tensor | None,  # [Hq * D, H], [Hq * D]
    k_weight: torch.Tensor, k_bias: torch.Tensor | None,  # [Hkv * D, H], [Hkv * D]
    v_weight: torch.Tensor, v_bias: torch.Tensor | None,  # [Hkv * D, H], [Hkv * D]
    cos: torch.Tensor, sin: torch.Tensor,  # [T, D]
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # query [T, Hq, D], key, value [T, Hkv, D]
    x, tokens = rms_norm(hidden, norm_weight, eps), hidden.shape[0]
    query = F.linear(x, q_weight, q_bias).view(tokens, -1, head_dim)
    key = F.linear(x, k_weight, k_bias).view(tokens, -1, head_dim)
    value = F.linear(x, v_weight, v_bias).view(tokens, -1, head_dim)
    return rope(query, cos, sin), rope(key, cos, sin), value


def mlp_block(
    hidden: torch.Tensor,  # [T, H]: the layer's input (the residual stream)
    attention: torch.Tensor,  # [T, Hq * D]
    o_weight: torch.Tensor, o_bias: torch.Tensor | None,  # [H, Hq * D], [H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    gate_weight: torch.Tensor, gate_bias: torch.Tensor | None,  # [I, H], [I]
    up_weight: torch.Tensor, up_bias: torch.Tensor | None,  # [I, H], [I]
    down_weight: torch.Tensor, down_bias: torch.Tensor | None,  # [H, I], [H]
) -> torch.Tensor:  # [T, H]: the layer's output
    hidden = hidden + F.linear(attention, o_weight, o_bias)
    x = rms_norm(hidden, norm_weight, eps)
    return hidden + F.linear(F.silu(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias),
                             down_weight, down_bias)
