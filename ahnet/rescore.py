"""``python -m ahnet.rescore``: runs the command ahnet.commands.rescore (an entry point kept where people type it)."""
import sys

from ahnet.commands.rescore import main

if __name__ == "__main__":
    sys.exit(main())
