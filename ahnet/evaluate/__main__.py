"""``python -m ahnet.evaluate``: runs the command ahnet.commands.evaluate (an entry point kept where people type it)."""
import sys

from ahnet.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
