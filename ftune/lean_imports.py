"""Keep bitsandbytes out of the processes that load no 4-bit model: importing it costs about a CPU-second.

peft imports bitsandbytes whenever it is installed (``peft.helpers``), and bitsandbytes imports
torch's compiler stack with it. Only QLoRA uses it. A Train worker or a Serve replica starting on a
small node pays that second on every start and restart, so those processes mark it missing first.
"""

from __future__ import annotations

import sys

BITSANDBYTES = "bitsandbytes"


def skip_bitsandbytes(*, quantized: bool) -> bool:
    """Make bitsandbytes unavailable in this process unless it loads a quantized model; True if it did.

    ``sys.modules[name] = None`` is Python's own way to mark a module missing: ``import bitsandbytes``
    then raises ``ModuleNotFoundError`` (which peft catches) and ``importlib.util.find_spec`` returns
    None (which is how peft and transformers check for it). Call it only in a process that serves one
    job (a Train worker, a Serve replica) and before peft or transformers are imported there; it does
    nothing once bitsandbytes is imported.
    """
    if quantized or BITSANDBYTES in sys.modules:
        return False
    sys.modules[BITSANDBYTES] = None  # type: ignore[assignment]
    return True
