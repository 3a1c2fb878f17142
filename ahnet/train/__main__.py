import sys

from ahnet.train.cli import main

sys.exit(main())
