"""specbeam: lossless speculative decoding for Hugging Face causal language models."""
from specbeam.config import SpecConfig
from specbeam.engine import Engine, patch, unpatch
from specbeam.optimal_stopping import optimal_cut

__all__ = ["Engine", "SpecConfig", "optimal_cut", "patch", "unpatch"]
