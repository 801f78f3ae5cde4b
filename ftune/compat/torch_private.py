"""torch internals ftune relies on, each wrapped once (tested in test_compat)."""

from __future__ import annotations

import contextlib
import io
from typing import Any


def extension_build_dir(name: str) -> str:
    """The directory torch builds (and caches) C++ extension ``name`` in (``$TORCH_EXTENSIONS_DIR``/...).

    ``torch.utils.cpp_extension._get_build_directory``: the public ``load`` builds there but does not say
    where, and a cached build is recognised only by its file there. Creates the directory; quiet.
    """
    from torch.utils.cpp_extension import _get_build_directory

    with contextlib.redirect_stdout(io.StringIO()):
        return _get_build_directory(name, verbose=False)


def set_last_lr(scheduler: Any, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` return ``lrs`` (``LRScheduler._last_lr``).

    After a restore sets the optimizer's learning rates by hand (a PBT exploit's new base rate), the
    scheduler's record of them must agree; only ``step()`` sets it publicly, and stepping moves the schedule.
    """
    scheduler._last_lr = list(lrs)
