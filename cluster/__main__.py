"""``python -m cluster local up|down|status ...``: the same as ``ftune cluster ...``."""

import sys

from cluster.cli import main
from ftune.entrypoint import run_job

if __name__ == "__main__":
    sys.exit(run_job(main))
