"""What a run started by ftune prints: ftune's own lines on the terminal, Ray's internals in Ray's log files.

With ``log_to_driver`` Ray copies every line any worker, actor or raylet of the job prints to the
driver's terminal: its own actors' chatter (placement-group cleaners, preemption watchers, raylet
warnings) along with ftune's progress. :func:`show_only_ftune_lines` replaces Ray's printer with one
that keeps the lines ftune's workers and Train controller print (``[ftune] ...``, ``[<run>] step ...``:
a tag in brackets that is not a timestamp) and drops the rest, which Ray keeps in the session's log
directory (said once). Errors are not lost: a failed worker's exception, with its
traceback, reaches the driver through Ray Train or Tune and is printed by the job.

``--verbose`` (or ``FTUNE_VERBOSE=1``) keeps Ray's printer as it is.
"""

from __future__ import annotations

import contextlib
import os
import re

FTUNE_PREFIX = "[ftune]"
FTUNE_LINE = re.compile(r"^\[(?!\d)[\w.:@/-]+\] ")
"""ftune's lines from workers: ``[ftune] ...`` or ``[<run name>] step ...``. Ray's and DeepSpeed's own
log lines start with a bracketed timestamp (``[2026-12-03 10:00:00,123 E ...]``) and stay in the files."""
VERBOSE_ENV = "FTUNE_VERBOSE"


def verbose_requested(flag: bool = False) -> bool:
    """True when ``--verbose`` was given or ``FTUNE_VERBOSE`` is set to a true value."""
    return flag or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def ftune_lines(data: dict) -> list[str]:
    """The lines of one batch of worker output that belong on the terminal (ftune's own, prefix kept)."""
    return [line for line in data.get("lines", []) if FTUNE_LINE.match(line)]


_muted: list[bool] = []


@contextlib.contextmanager
def worker_lines_muted(verbose: bool = False):
    """Within the block no worker line reaches the terminal (unless verbose): a stage that prints its own
    summary lines, such as a sweep whose trials would each print their progress."""
    if verbose_requested(verbose):
        yield
        return
    _muted.append(True)
    try:
        yield
    finally:
        _muted.pop()


def _print_ftune_lines(data: dict, print_file, ignore_prefix: bool = False) -> None:
    # Ray Train copies a worker's stdout to its stderr as well: ftune prints its lines to stdout, so the
    # stderr copy is dropped rather than shown twice.
    if _muted or data.get("is_err"):
        return
    lines = ftune_lines(data)
    if lines:
        print_file.write("".join(f"{line}\n" for line in lines))
        print_file.flush()


def show_only_ftune_lines(verbose: bool = False) -> str | None:
    """After ``ray.init(log_to_driver=True)``: print only ftune's lines from workers; return Ray's log dir.

    Does nothing (and returns None) when verbose, or when this process is not a Ray driver.
    """
    import ray

    from ftune.compat import ray_private

    if verbose_requested(verbose) or not ray.is_initialized():
        return None
    printer = ray_private.worker_log_printer()
    if printer is None:
        return None  # a Ray that prints worker output some other way: leave it as it is
    if printer is not _print_ftune_lines:
        _replaced.append(printer)
        ray_private.set_worker_log_printer(_print_ftune_lines)
    return ray_log_dir()


_replaced: list = []


def show_everything() -> None:
    """Undo :func:`show_only_ftune_lines` (for a process that goes on to run other Ray drivers)."""
    from ftune.compat import ray_private

    if _replaced:
        ray_private.set_worker_log_printer(_replaced.pop())


QUIET_LOGGERS = {"ray": "ERROR", "ray.serve": "WARNING", "DeepSpeed": "ERROR"}
"""Driver-side library loggers lowered unless verbose: Ray's start-up and token-auth notices, Serve's
per-deployment INFO lines, DeepSpeed's INFO lines. Their errors (and Serve's warnings) still print."""


def ray_logging_level(verbose: bool = False) -> str:
    """The ``logging_level`` to give ``ray.init`` in a run started by ftune."""
    return "INFO" if verbose_requested(verbose) else "ERROR"


def quiet_libraries(verbose: bool = False) -> None:
    """Lower the driver's library loggers to errors (unless verbose), before Ray or DeepSpeed log."""
    import logging

    if verbose_requested(verbose):
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # DeepSpeed warns at import that it fell back to the CPU ("Setting accelerator to CPU ..."), before
    # its logger can be lowered; naming the accelerator it would pick anyway turns that into an INFO line.
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def ray_log_dir() -> str | None:
    """The log directory of the connected Ray session on this node, if it is local."""
    from ftune.compat import ray_private

    try:
        return ray_private.session_log_dir()
    except Exception:  # a client connection, or a Ray without the attribute: nothing to point at
        return None


def announce_ray_logs(log_dir: str | None) -> None:
    """Say once where Ray's own output went."""
    if log_dir:
        print(f"{FTUNE_PREFIX} Ray's own logs: {log_dir} (--verbose or {VERBOSE_ENV}=1 shows them here)", flush=True)
