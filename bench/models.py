"""Random-weight models for the benchmarks: the work is the same whatever the weights."""
import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def random_llama_20m() -> LlamaForCausalLM:
    """~21.7M parameters: vocab 16000, hidden 384, 6 layers, grouped-query attention (6 heads, 2 KV)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=None, pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:  # [batch, length]
    return torch.randint(2, 16000, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
