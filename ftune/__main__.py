"""`python -m ftune <command>`: the same as the ``ftune`` console script.

The one module of the core that names the command above it: a launcher for ``python -m``, which only
looks for ``__main__`` in the package the user names. Nothing imports it.
"""

import sys

from ftune_cli.command import main

sys.exit(main())
