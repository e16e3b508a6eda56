"""`python -m largebatch`: the same command line as the `largebatch` script."""

import sys

from largebatch.cli import main

sys.exit(main())
