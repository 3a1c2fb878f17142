"""``python -m ahnet.client``: runs the command ahnet.commands.client (an entry point kept where people type it)."""
import sys

from ahnet.commands.client import main

if __name__ == "__main__":
    sys.exit(main())
