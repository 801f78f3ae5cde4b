"""``python -m serve --config configs/serve/tiny.yaml [...]``: the same as ``ftune serve``."""

import sys

import serve.cli
from ftune.entrypoint import run_job

sys.exit(run_job(serve.cli.main))
