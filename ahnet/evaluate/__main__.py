import sys

from ahnet.evaluate.cli import main

sys.exit(main())
