"""`python -m specbeam.cli`: the same as the `specbeam` console script."""
import sys

from specbeam.cli import main

sys.exit(main())
