"""Ctrl-C after a Ray run: give the process back the SIGINT handler it had before the run.

Ray Train's ``TrainController`` driver and Ray Tune's ``Tuner.fit`` install their own SIGINT handler
for a run (abort the run, checkpoint the experiment) and leave it installed when the run returns.
A process that goes on afterwards -- ``ftune demo --keep-serving`` serving the winner until Ctrl-C --
would then never see a KeyboardInterrupt: Ctrl-C would only "end" a Tune run that is long over.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """Put back this process's SIGINT handler when the block ends (main thread only: others cannot set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
