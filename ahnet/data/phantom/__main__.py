"""python -m ahnet.data.phantom: generate a phantom dataset (see cli.main)."""
from ahnet.data.phantom.cli import main

raise SystemExit(main())
