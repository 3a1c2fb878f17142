"""``python -m ahnet.lever``: runs the command ahnet.commands.lever (an entry point kept where people type it)."""
import sys

from ahnet.commands.lever import main

if __name__ == "__main__":
    sys.exit(main())
