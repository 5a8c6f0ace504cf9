"""Triton runs through its CPU interpreter unless TRITON_INTERPRET is set otherwise (before triton is imported)."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the tensors of a test live: the GPU when Triton compiles for real, the CPU under the interpreter."""
    return torch.device("cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda")
