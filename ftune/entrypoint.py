"""How every job's ``main(argv)`` runs: user mistakes become a message and exit 2, and usage names the command typed.

Each job runs both as ``python -m train|tune|serve|cluster`` and as a subcommand of the ``ftune``
command (``ftune_cli``). The jobs sit below that command, so the name it was invoked as is handed
down through ``invoked_as`` rather than the jobs importing the command.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from ftune.console import quiet_libraries
from ftune.errors import JobFailed, UserError

_INVOKED_AS: ContextVar[str | None] = ContextVar("ftune_invoked_as", default=None)
"""``ftune <command>`` while a subcommand runs under the ``ftune`` command; None otherwise."""


def prog(module_form: str) -> str:
    """The program name a job's usage and ``--help`` show: ``ftune <command>`` when run as one, else ``module_form``.

    Args:
        module_form: how the job is run without ``ftune``, e.g. ``python -m tune``.
    """
    return _INVOKED_AS.get() or module_form


@contextmanager
def invoked_as(name: str) -> Iterator[None]:
    """Within the block, ``prog`` returns ``name`` (e.g. ``ftune sweep``); the previous name is restored after."""
    token = _INVOKED_AS.set(name)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def run_job(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a job's ``main``, turning user errors into a message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        return int(main(list(sys.argv[1:] if argv is None else argv)) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except JobFailed as e:
        print(f"error: job failed: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
