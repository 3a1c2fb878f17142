"""``python -m ahnet.export``: runs the command ahnet.commands.export (an entry point kept where people type it)."""
import sys

from ahnet.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
