"""Ray Train's ``TorchTrainer`` as ftune runs it: without the Ray Data machinery it never uses.

ftune ships its tokenized data to the workers through the object store (``loop_config["data"]``),
not as Ray Datasets. Ray Train V2 still sets up Ray Data for every worker group it starts: a
``DatasetManager`` actor (a process importing ``ray.data``) and a call on every worker that
installs Ray Data's context (importing ``ray.data`` there too). On a small node that is a few
CPU-seconds of every start and every restart, so the trainer leaves that callback out when it is
given no datasets. Anything given datasets gets Ray's behaviour unchanged.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

try:  # a private module: if a Ray release moves it, the trainer keeps Ray's default callbacks
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:  # pragma: no cover - depends on the installed Ray
    DatasetsCallback = None


class LoraTrainer(TorchTrainer):
    """A ``TorchTrainer`` that sets up Ray Data only when it is given datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets or DatasetsCallback is None:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
