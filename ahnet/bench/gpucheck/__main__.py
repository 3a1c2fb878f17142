"""``python -m ahnet.bench.gpucheck``: see the package docstring, or ``--help``."""
import sys

from ahnet.bench.gpucheck.cli import main

sys.exit(main())
