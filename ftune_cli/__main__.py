"""``python -m ftune_cli <command>``: the same as the ``ftune`` console script."""

import sys

from ftune_cli.command import main

sys.exit(main())
