"""``python -m ahnet.pipeline``: runs the command ahnet.commands.pipeline (an entry point kept where people type it)."""
import sys

from ahnet.commands.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
