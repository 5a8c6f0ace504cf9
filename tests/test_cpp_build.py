"""Where the install did not build specbeam._C: the C++ kernels compiled at first use into a cache directory (once,
saying so on stderr; the same bits as the install's build), or, where they cannot be, the reference with one
warning."""
import os
import shutil
import sys
import warnings

import pytest
import torch

import specbeam
from specbeam import linear_weight, ops


@pytest.fixture
def session_kernels():
    """The kernels this session runs on (specbeam._C in CI), loaded before a test hides specbeam._C."""
    return ops._load_cpp()[0]


@pytest.fixture
def not_built_at_install(monkeypatch, tmp_path):
    """As if the install had not built specbeam._C, with an empty cache for the build at first use."""
    monkeypatch.delattr(specbeam, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "specbeam._C", None)  # the import fails
    monkeypatch.setenv("SPECBEAM_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECBEAM_NO_JIT", raising=False)
    return tmp_path


def test_compiled_once_at_first_use_with_the_install_builds_bits(session_kernels, not_built_at_install, capfd):
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}): specbeam falls back to its reference")
    module, how = ops._load_cpp.__wrapped__()
    assert module is not None, how
    build_dir = how.removeprefix("compiled at first use (").removesuffix(")")
    assert os.path.dirname(build_dir) == str(not_built_at_install)
    assert capfd.readouterr().err.count("specbeam: compiling the C++ kernels") == 1
    assert all(hasattr(module, op) for op in ops.CPP_OPS)
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=gen) for shape in ((3, 96), (40, 96), (40,)))
    packed = linear_weight.for_kernel(weight, x.dtype)
    assert torch.equal(module.linear(x, packed, bias), session_kernels.linear(x, packed, bias))
    again, _ = ops._load_cpp.__wrapped__()  # a later process: loads the build
    assert hasattr(again, "linear") and "compiling" not in capfd.readouterr().err


def test_without_a_compiler_the_reference_runs_with_one_warning(not_built_at_install, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, why = ops._load_cpp.__wrapped__()
    assert module is None and "no C++ compiler (no-such-compiler is not on PATH)" in why
    assert [str(w.message) for w in caught] == [f"specbeam runs its torch reference on the CPU, 2-3x slower ({why})"]


def test_specbeam_no_jit_takes_the_reference_quietly(not_built_at_install, monkeypatch):
    monkeypatch.setenv("SPECBEAM_NO_JIT", "1")
    monkeypatch.setattr(ops, "_load_cpp", ops._load_cpp.__wrapped__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = ops.backend_info()
    assert all(info[op] == "reference: specbeam._C not built at install, and SPECBEAM_NO_JIT=1" for op in ops.CPP_OPS)
    assert not any(not_built_at_install.iterdir())
