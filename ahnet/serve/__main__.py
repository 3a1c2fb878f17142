"""``python -m ahnet.serve``: runs the command ahnet.commands.serve (an entry point kept where people type it)."""
import sys

from ahnet.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
