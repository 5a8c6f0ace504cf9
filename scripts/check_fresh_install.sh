#!/usr/bin/env bash
# A plain `pip install .` into a fresh virtual environment gets the C++ kernels: pip's build isolation has no torch,
# so the install builds no specbeam._C, and the first use compiles them (into an empty cache here). torch and the
# other dependencies come from this machine's Python (--system-site-packages): nothing big is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q .
cd "$work"  # away from the source tree, whose specbeam/ would be imported instead of the installed one
SPECBEAM_CACHE="$work/cache" "$work/venv/bin/python" - <<'PY'
import sys

# an editable specbeam installed on the machine itself (by CI, by a developer) would lend this one its specbeam._C
sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in getattr(finder, "__module__", "")]
import specbeam
from specbeam import ops

linear = ops.backend_info()["linear"]
print(f"fresh install: {specbeam.__file__}: linear on {linear}")
assert specbeam.__file__.startswith(sys.prefix), "not the installed specbeam"
assert linear.startswith("cpp: compiled at first use"), linear
PY
