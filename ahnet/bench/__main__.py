"""``python -m ahnet.bench``: see the package docstring, or ``--help``."""
import sys

from ahnet.bench.cli import main

sys.exit(main())
