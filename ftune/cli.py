"""The ``ftune`` command: one subcommand per job, each delegating to its package's ``main(argv)``.

Every job also runs as ``python -m train|tune|serve --config FILE [key=value ...]`` (what
``ray job submit --working-dir .`` runs); both paths go through ``run_job`` so a user mistake
prints a clear message and exits 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar

from ftune.console import quiet_libraries
from ftune.errors import JobFailed, UserError

# subcommand -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ftune.demo", "the whole product locally: train, budgeted sweep, serve the winner, ask it"),
    "train": ("train.job", "run a distributed LoRA training job on Ray Train + DeepSpeed"),
    "sweep": ("tune.sweep", "sweep LoRA rank, alpha and learning rate on Ray Tune under a dollar budget"),
    "serve": ("serve.cli", "serve adapters behind an OpenAI-compatible API on Ray Serve"),
    "export": ("serve.export", "merge an adapter into its base model for engines without LoRA"),
    "cluster": ("cluster.cli", "a local multi-node Ray cluster: up/down/status/kill-worker/drain-worker"),
    "build-tiny-model": ("ftune.tiny_model", "build the built-in tiny Llama model and sample data"),
}

_INVOKED_AS: ContextVar[str | None] = ContextVar("ftune_invoked_as", default=None)
"""``ftune <command>`` while a subcommand runs under the ``ftune`` command; None otherwise."""


def prog(module_form: str) -> str:
    """The program name a job's usage and ``--help`` show: ``ftune <command>`` when run as one, else ``module_form``.

    Args:
        module_form: how the job is run without ``ftune``, e.g. ``python -m tune``.
    """
    return _INVOKED_AS.get() or module_form


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


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return f"usage: ftune <command> [options]\n\ncommands:\n{rows}\n\n'ftune <command> --help' for a command's options."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ftune`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        import difflib

        guess = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f" Did you mean 'ftune {guess[0]}'?" if guess else ""
        print(f"error: unknown command {command!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    token = _INVOKED_AS.set(f"ftune {command}")
    try:
        return run_job(module.main, rest)
    finally:
        _INVOKED_AS.reset(token)


if __name__ == "__main__":
    sys.exit(main())
