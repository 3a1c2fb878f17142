"""python -m ahnet.serve: the Triton server (ahnet.serve.server)."""
import sys

from .server import main

sys.exit(main())
