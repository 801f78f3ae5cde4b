"""`python -m ftune <command>`: the same as the ``ftune`` console script."""

import sys

from ftune.cli import main

sys.exit(main())
