"""specbeam: lossless speculative decoding for Hugging Face causal language models."""
from specbeam.config import SpecConfig
from specbeam.engine import Engine, patch, unpatch
from specbeam.optimal_stopping import optimal_cut
from specbeam.router import RouterConfig

__all__ = ["Engine", "RouterConfig", "SpecConfig", "optimal_cut", "patch", "unpatch"]
