"""Random-weight models for the benchmarks: the work is the same whatever the weights."""
import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         eos_token_id=None, pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(config).eval().to(DEVICE)


@functools.cache
def random_llama_20m() -> LlamaForCausalLM:
    """~21.7M parameters: vocab 16000, hidden 384, 6 layers, grouped-query attention (6 heads, 2 KV)."""
    return random_llama(16000, 384, 1024, 6, 6, 2)


@functools.cache
def one_layer_llama() -> LlamaForCausalLM:
    """1 layer, hidden 16: the forward costs almost nothing, so the time is the engine's own."""
    return random_llama(512, 16, 32, 1, 2, 1)


def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:  # [batch, length]
    return torch.randint(2, 16000, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
