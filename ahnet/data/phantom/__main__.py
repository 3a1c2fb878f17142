"""python -m ahnet.data.phantom: generate a phantom dataset (see cli.main)."""
from .cli import main

raise SystemExit(main())
