"""``python -m ahnet.data.phantom``: runs the command ahnet.commands.phantom (an entry point kept where people type it)."""
import sys

from ahnet.commands.phantom import main

if __name__ == "__main__":
    sys.exit(main())
