"""`python -m tune --config FILE [key=value ...]` (what `ray job submit` runs); the same as `ftune sweep`."""

import sys

from ftune.entrypoint import run_job
from tune.sweep import main

sys.exit(run_job(main))
