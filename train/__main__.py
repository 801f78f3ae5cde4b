"""`python -m train --config FILE [section.key=value ...]` (what `ray job submit` runs)."""

import sys

from ftune.entrypoint import run_job
from train.job import main

sys.exit(run_job(main))
