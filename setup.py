"""Builds the C++ kernels specbeam._C (csrc/) with torch's cpp_extension and ninja, where it can.

That needs torch in the build environment (`pip install --no-build-isolation .`). Without it (pip's default
build isolation), without a C++ compiler, or when the build fails, the package installs anyway: specbeam then
compiles the kernels at first use (specbeam/cpp_build.py), or runs its reference code where it cannot."""
import glob
import importlib.util
import warnings
from pathlib import Path

from setuptools import setup


def _warn_skipped(reason: str) -> None:
    warnings.warn(f"specbeam._C not built ({reason}); specbeam will compile its kernels at first use, or else "
                  "use its reference code on the CPU")


def _compile_flags() -> tuple[list[str], list[str]]:
    """specbeam/cpp_build.py's flags, the first-use build's, loaded by path: importing specbeam needs its
    dependencies."""
    spec = importlib.util.spec_from_file_location("specbeam_cpp_build", Path(__file__).parent / "specbeam/cpp_build.py")
    cpp_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpp_build)
    return cpp_build.compile_flags()


def _extension_args() -> dict:
    """ext_modules and cmdclass for specbeam._C, or nothing when torch cannot build it."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        _warn_skipped(f"torch is not importable at build time: {error}")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed build (no compiler, bad toolchain) is a warning, not a failed installation."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001: any failure means "compile at first use, or the reference"
                _warn_skipped(f"{type(error).__name__}: {error}")

    cflags, ldflags = _compile_flags()
    extension = CppExtension("specbeam._C", sorted(glob.glob("csrc/*.cpp")), extra_compile_args=cflags,
                             extra_link_args=ldflags)
    return dict(ext_modules=[extension], cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)})


setup(**_extension_args())
