"""``python -m ahnet.gpucheck``: runs the command ahnet.commands.gpucheck (an entry point kept where people type it)."""
import sys

from ahnet.commands.gpucheck import main

if __name__ == "__main__":
    sys.exit(main())
