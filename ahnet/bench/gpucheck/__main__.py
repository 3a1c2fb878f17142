"""``python -m ahnet.bench.gpucheck``: see the package docstring, or ``--help``."""
import sys

from .cli import main

sys.exit(main())
