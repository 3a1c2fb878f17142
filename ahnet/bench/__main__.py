"""``python -m ahnet.bench``: runs the command ahnet.commands.bench (an entry point kept where people type it)."""
import sys

from ahnet.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
