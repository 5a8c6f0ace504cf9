"""Which backend the CPU gets: CI has a compiler, so the C++ kernels must be built (at install or at first use)
and chosen."""
import os
import shutil

import pytest
import torch

from specbeam import ops


def test_cpp_extension_is_built_where_a_compiler_is():
    compiler = os.environ.get("CXX", "c++")  # what torch's cpp_extension compiles with
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}): specbeam falls back to its reference")
    module, reason = ops._load_cpp()
    assert module is not None, reason
    assert all(ops.backend_info()[op] == f"cpp: {reason}" for op in ops.CPP_OPS)
    assert ops._pick(None, torch.device("cpu")) == "cpp"


def test_forcing_an_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="cpp"):
        ops.sample(torch.zeros(1, 3), backend="c++")
