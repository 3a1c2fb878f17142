"""``python -m ahnet.train``: runs the command ahnet.commands.train (an entry point kept where people type it)."""
import sys

from ahnet.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
