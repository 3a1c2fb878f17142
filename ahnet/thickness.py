"""``python -m ahnet.thickness``: runs the command ahnet.commands.thickness (an entry point kept where people type it)."""
import sys

from ahnet.commands.thickness import main

if __name__ == "__main__":
    sys.exit(main())
