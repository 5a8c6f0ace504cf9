"""Builds the optional C++ extension specbeam._C (csrc/) with torch's cpp_extension and ninja.

Needs torch in the build environment (`pip install --no-build-isolation -e .`). Without torch, without a
C++ compiler, or when the build fails, the package installs anyway and specbeam runs on its reference code."""
import glob
import sys
import warnings

from setuptools import setup


def _warn_skipped(reason: str) -> None:
    warnings.warn(f"specbeam._C not built ({reason}); specbeam will use its reference code on the CPU")


def _extension_args() -> dict:
    """ext_modules and cmdclass for specbeam._C, or nothing when torch cannot build it."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        _warn_skipped(f"torch is not importable at build time: {error}")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed build (no compiler, bad toolchain) is a warning, not a failed installation."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001: any failure means "use the reference"
                _warn_skipped(f"{type(error).__name__}: {error}")

    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    extension = CppExtension(
        "specbeam._C",
        sorted(glob.glob("csrc/*.cpp")),
        # built where it runs (pip install on the machine itself), so the native vector units are fair game
        extra_compile_args=["-O3", "-g0", "-march=native", *openmp],
        extra_link_args=openmp,
    )
    return dict(ext_modules=[extension], cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)})


setup(**_extension_args())
