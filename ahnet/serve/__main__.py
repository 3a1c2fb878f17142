"""python -m ahnet.serve: the Triton server (ahnet.serve.server)."""
import sys

from ahnet.serve.server import main

sys.exit(main())
