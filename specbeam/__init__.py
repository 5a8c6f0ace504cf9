"""specbeam: lossless speculative decoding for Hugging Face causal language models."""
from specbeam.engine import Engine, patch, unpatch

__all__ = ["Engine", "patch", "unpatch"]
