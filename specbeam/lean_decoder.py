"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2): transformers' maths, on the model's weights
(packed once for the C++ linear on the CPU), without the module machinery (hooks, mask building, output records,
kwargs plumbing) that costs a small model more than its arithmetic. Each layer is two ops around its attention
(`attention_inputs`, `mlp_block`: one C++ call each on the CPU). Other models run their own forward."""
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specbeam import linear_weight, ops
from specbeam.reference.decoder import rms_norm

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


def _layer_weights(layer, weight) -> tuple[tuple, tuple]:
    """The arguments of `attention_inputs` and `mlp_block` that are the layer's own; `weight` puts each linear
    weight in the form the chosen backend reads."""
    attn, mlp, norm1, norm2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
    q, k, v, o = (weight(m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    gate, up, down = (weight(m.weight) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    before = (norm1.weight, norm1.variance_epsilon, q, attn.q_proj.bias, k, attn.k_proj.bias, v, attn.v_proj.bias)
    after = (o, attn.o_proj.bias, norm2.weight, norm2.variance_epsilon, gate, mlp.gate_proj.bias, up,
             mlp.up_proj.bias, down, mlp.down_proj.bias)
    return before, after


class LeanDecoder:
    """model(input_ids, position_ids, logits_to_keep) for one packed row of T tokens, attention supplied. The
    backend of the layers is chosen once (`ops.layer_backend`), and the weights are put in its form then."""

    def __init__(self, model: PreTrainedModel, weights: str | None = None):
        """weights: read every linear weight as stored (None), rounded to "bfloat16" or quantized to "int8"
        (`linear_weight.read_as`: a copy; the model is not changed)."""
        decoder = model.model
        self.embed, self.rotary = decoder.embed_tokens, decoder.rotary_emb
        # rope types whose frequencies depend on the longest position of a call are computed per call
        self.rope_cached = not any(k in self.rotary.rope_type for k in ("dynamic", "longrope"))
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: [positions, head_dim]
        backend, self.ops = ops.layer_backend(model.device, model.dtype)

        def weight(w: torch.Tensor) -> torch.Tensor:  # [N, K]: packed for C++, as it is read for the reference
            return linear_weight.for_cpp(w, weights) if backend == "cpp" else linear_weight.read_as(w, weights)

        self.layers = [_layer_weights(layer, weight) for layer in decoder.layers]
        self.norm, self.head_weight, self.head_bias = decoder.norm, weight(model.lm_head.weight), model.lm_head.bias
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = decoder.layers[0].self_attn.scaling

    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        logit_rows: torch.Tensor,  # [R] rows of the packed tokens to score
        attend: Attend,
        num_positions: int,  # every position is below it
    ) -> torch.Tensor:  # [R, vocab]
        hidden = F.embedding(input_ids, self.embed.weight)  # the module's own call, without the module machinery
        cos, sin = self._rope(hidden, positions, num_positions)
        for index, (before, after) in enumerate(self.layers):
            query, key, value = self.ops.attention_inputs(hidden, *before, cos, sin, self.head_dim)
            attention = attend(index, query, key, value, self.scale).reshape(hidden.shape[0], -1)
            hidden = self.ops.mlp_block(hidden, attention, *after)
        last = rms_norm(hidden[logit_rows], self.norm.weight, self.norm.variance_epsilon)
        return self.ops.linear(last, self.head_weight, self.head_bias)

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, num_positions: int):  # [T, H], [T] -> [T, D] x 2
        """The rotary module's cos and sin at `positions`: read from a table of the module's own values (each
        position's are computed elementwise, so the same bits), grown to the next power of two as needed."""
        if not self.rope_cached:
            return (t[0] for t in self.rotary(hidden[None], positions[None]))
        if self.rope_table is None or self.rope_table[0].shape[0] < num_positions:
            every = torch.arange(1 << max(num_positions - 1, 1).bit_length(), device=positions.device)
            self.rope_table = tuple(t[0] for t in self.rotary(hidden[None], every[None]))
        return (t[positions] for t in self.rope_table)
