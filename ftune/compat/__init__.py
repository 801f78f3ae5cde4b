"""Every private Ray, DeepSpeed, torch and PEFT API ftune uses, each behind one named, tested function.

A library upgrade that moves one of them fails ``tests/unit/test_compat.py`` by the entry's name instead
of a job at run time. Each module imports its library lazily, so importing one costs nothing:

* :mod:`ftune.compat.ray_private`: functions over Ray internals (log printer, GCS, auth, Serve, Tune).
* :mod:`ftune.compat.ray_private_hooks`: the Ray classes ftune subclasses through private methods, with
  those methods renamed to public ones (importing it imports Ray Train and Tune).
* :mod:`ftune.compat.torch_private`, :mod:`ftune.compat.deepspeed_private`,
  :mod:`ftune.compat.peft_private`: the few private names of those libraries.

The core package: it imports nothing from ``train``, ``tune``, ``serve`` or ``cluster``.
"""
