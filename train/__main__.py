"""`python -m train --config FILE [section.key=value ...]` (what `ray job submit` runs)."""

import sys

from ftune.cli import run_job
from train.job import main

sys.exit(run_job(main))
