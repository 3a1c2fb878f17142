"""``python -m ahnet.predict``: runs the command ahnet.commands.predict (an entry point kept where people type it)."""
import sys

from ahnet.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
