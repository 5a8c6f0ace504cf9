"""Tiny random-weight decoders of several architectures, in float64, and left-padded prompt batches."""
import functools

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
PAD, BOS = 0, 1
_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, **_DECODER, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON, **_DECODER, num_key_value_heads=1)),
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(**_COMMON, **_DECODER, num_key_value_heads=2, sliding_window=None)
    ),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**_COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=False)),
}


@functools.cache
def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed + list(ARCHITECTURES).index(arch))
    model = ARCHITECTURES[arch]().to(torch.float64).eval()
    # sharper next-token distributions than the default init, so that beams differ and eos gets picked
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def left_padded_batch(lengths=(7, 3, 5), seed: int = 0, low: int = 3):
    """input_ids [batch, max(lengths)] left-padded with PAD, and the matching attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, width - n :] = torch.randint(low, VOCAB, (n,), generator=generator)
        attention_mask[row, width - n :] = 1
    return input_ids, attention_mask
