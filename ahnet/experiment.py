"""``python -m ahnet.experiment``: runs the command ahnet.commands.experiment (an entry point kept where people type it)."""
import sys

from ahnet.commands.experiment import main

if __name__ == "__main__":
    sys.exit(main())
