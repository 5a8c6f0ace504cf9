"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2): transformers' maths op for op, on the
model's own weights, without the module machinery (hooks, mask building, output records, kwargs plumbing)
that costs a small model more than its arithmetic. A model it does not recognise runs its own forward."""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

LEAN_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# attend(layer_idx, query [T, Hq, D], key [T, Hkv, D], value [T, Hkv, D], scale) -> [T, Hq, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the lean decoder cannot stand in for this model's forward, or None when it can."""
    config = model.config
    if type(model).__name__ not in LEAN_ARCHITECTURES:
        return f"{type(model).__name__} is not one of {LEAN_ARCHITECTURES}"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} (the lean decoder implements silu)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


@dataclass
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def of(cls, module: torch.nn.Linear) -> "Linear":
        return cls(module.weight, module.bias)


@dataclass
class RMSNorm:
    """y = w * (x / sqrt(mean(x^2) + eps)), the mean and the scaling in float32, as transformers does."""

    weight: torch.Tensor  # [hidden]
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    @classmethod
    def of(cls, module) -> "RMSNorm":
        return cls(module.weight, module.variance_epsilon)


@dataclass
class Layer:
    input_norm: RMSNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: RMSNorm
    gate: Linear
    up: Linear
    down: Linear

    @classmethod
    def of(cls, layer) -> "Layer":
        attn, mlp = layer.self_attn, layer.mlp
        return cls(RMSNorm.of(layer.input_layernorm), *map(Linear.of, (attn.q_proj, attn.k_proj, attn.v_proj,
                   attn.o_proj)), RMSNorm.of(layer.post_attention_layernorm),
                   *map(Linear.of, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). x: [T, H, D]; cos, sin: [T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanDecoder:
    """model(input_ids, position_ids, logits_to_keep) for one packed row of T tokens, attention supplied."""

    def __init__(self, model: PreTrainedModel):
        decoder = model.model
        self.embed, self.rotary = decoder.embed_tokens, decoder.rotary_emb
        self.layers = [Layer.of(layer) for layer in decoder.layers]
        self.norm, self.head = RMSNorm.of(decoder.norm), Linear.of(model.lm_head)
        config = model.config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = decoder.layers[0].self_attn.scaling

    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        logit_rows: torch.Tensor,  # [R] rows of the packed tokens to score
        attend: Attend,
    ) -> torch.Tensor:  # [R, vocab]
        hidden = self.embed(input_ids)
        cos, sin = (t[0] for t in self.rotary(hidden[None], positions[None]))
        for index, layer in enumerate(self.layers):
            hidden = hidden + self._attention(index, layer, layer.input_norm(hidden), cos, sin, attend)
            x = layer.post_norm(hidden)
            hidden = hidden + layer.down(F.silu(layer.gate(x)) * layer.up(x))
        return self.head(self.norm(hidden[logit_rows]))

    def _attention(self, index: int, layer: Layer, x: torch.Tensor, cos, sin, attend: Attend) -> torch.Tensor:
        tokens = x.shape[0]
        query = _rotate(layer.q(x).view(tokens, self.num_heads, self.head_dim), cos, sin)
        key = _rotate(layer.k(x).view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        value = layer.v(x).view(tokens, self.num_kv_heads, self.head_dim)
        return layer.o(attend(index, query, key, value, self.scale).reshape(tokens, -1))
