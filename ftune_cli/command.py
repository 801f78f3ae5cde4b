"""The ``ftune`` command: one subcommand per job, each delegating to its package's ``main(argv)``.

This package sits on top of all the others: it names the apps (``train``, ``tune``, ``serve``,
``cluster``) while nothing in the core ``ftune`` package names it or them. Every job also runs as
``python -m train|tune|serve --config FILE [key=value ...]`` (what ``ray job submit --working-dir .``
runs); both paths go through ``ftune.entrypoint.run_job`` so a user mistake prints a clear message
and exits 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys

from ftune.entrypoint import invoked_as, run_job

# subcommand -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ftune_cli.demo", "the whole product locally: train, budgeted sweep, serve the winner, ask it"),
    "train": ("train.job", "run a distributed LoRA training job on Ray Train + DeepSpeed"),
    "sweep": ("tune.sweep", "sweep LoRA rank, alpha and learning rate on Ray Tune under a dollar budget"),
    "serve": ("serve.cli", "serve adapters behind an OpenAI-compatible API on Ray Serve"),
    "export": ("serve.export", "merge an adapter into its base model for engines without LoRA"),
    "cluster": ("cluster.cli", "a local multi-node Ray cluster: up/down/status/kill-worker/drain-worker"),
    "build-tiny-model": ("ftune.builtin_assets", "build the built-in tiny Llama model and sample data"),
}


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
    with invoked_as(f"ftune {command}"):
        return run_job(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
