"""specbeam: lossless speculative decoding for Hugging Face causal language models."""
from specbeam.config import SpecConfig
from specbeam.engine import Engine, patch, unpatch

__all__ = ["Engine", "SpecConfig", "patch", "unpatch"]
