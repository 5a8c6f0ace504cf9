"""Compiles the C++ kernels (csrc/) at first use, for installs that did not build specbeam._C.

torch's cpp_extension compiles them with ninja into a cache directory per torch version, Python, machine and
sources: `$SPECBEAM_CACHE` (default `~/.cache/specbeam`) / `<torch>-<python>-<hash>`. The first process compiles,
saying so in one line on stderr; the others wait for it, then load. setup.py's install-time build takes its flags
from here too, so both builds compile alike; it loads this file by path, hence the standard library alone at the
top."""
import contextlib
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

NAME = "specbeam_C"  # the module's name (TORCH_EXTENSION_NAME in csrc/bindings.cpp); it offers what _C offers


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags). -march=native: each build is made on the machine that runs it."""
    import torch

    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    return ["-O3", "-g0", "-march=native", *openmp], openmp


def source_dir() -> Path:
    """csrc/: inside the installed package (a wheel), else beside it (a source tree, an editable install)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"specbeam's C++ sources (csrc/) are neither in {package} nor beside it")


def cache_dir(sources: Path) -> Path:
    """Where these sources build for this torch, Python and CPU (its flags, which -march=native compiles for)."""
    import torch

    digest = hashlib.sha256(f"{platform.machine()}\n{_cpu_flags()}\n{sources}\n".encode())
    for path in sorted(p for p in sources.rglob("*") if p.suffix in (".cpp", ".h")):
        digest.update(path.relative_to(sources).as_posix().encode() + b"\0" + path.read_bytes())
    root = Path(os.environ.get("SPECBEAM_CACHE") or Path.home() / ".cache" / "specbeam")
    return root / f"{torch.__version__}-{sys.implementation.cache_tag}-{digest.hexdigest()[:16]}"


def load() -> tuple[object, Path]:
    """(the kernels' module, its build directory), compiled there unless an earlier process did; raises, saying
    why, where it cannot be (no C++ compiler, no ninja, a failed build)."""
    _check_tools()
    sources = source_dir()
    build = cache_dir(sources)
    build.mkdir(parents=True, exist_ok=True)
    with _exclusive(build / "specbeam.lock"):
        (build / "lock").unlink(missing_ok=True)  # torch's own lock: left behind only by a process killed mid-build
        if not (build / f"{NAME}.so").exists():
            print(f"specbeam: compiling the C++ kernels (specbeam._C) once for this machine, about a minute, "
                  f"into {build}", file=sys.stderr, flush=True)
        return _compile(sources, build), build


def _compile(sources: Path, build: Path):
    """torch's cpp_extension.load (ninja: a no-op when the build is current); a failure's output goes to build.log."""
    from torch.utils import cpp_extension

    cflags, ldflags = compile_flags()
    try:
        return cpp_extension.load(name=NAME, sources=sorted(str(p) for p in sources.glob("*.cpp")),
                                  extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(build),
                                  verbose=False)
    except Exception as error:  # noqa: BLE001: the compiler's output, kept for the reader of the warning
        (build / "build.log").write_text(str(error))
        raise RuntimeError(f"the C++ build failed; its output: {build / 'build.log'}") from error


def _check_tools() -> None:
    """Raises where the compiler that torch calls ($CXX, else c++) or ninja is missing. ninja installed beside
    this Python (a virtual environment that is not activated) is put on PATH, where torch looks for it."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler} is not on PATH)")
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if shutil.which("ninja", path=scripts) is None:
            raise RuntimeError("no ninja (pip install ninja)")
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def _exclusive(path: Path):
    """One process at a time; the lock dies with its process (flock), unlike torch's lock file."""
    import fcntl  # POSIX; elsewhere the import fails, and specbeam runs its reference

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _cpu_flags() -> str:
    """The CPU's feature flags (the processor's name where /proc/cpuinfo does not list them)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()
