"""Resume checkpoints written straight to the file, not through a copy in memory.

Lightning's default ``TorchCheckpointIO`` saves through ``_atomic_save``, which serialises the
whole checkpoint into an ``io.BytesIO`` and only then writes it out: the training state is
held twice in host memory while it saves. For an SD1 U-Net trained in full that state is a
13.6 GB file (weights, AdamW moments, EMA), so a run that trains in ~17 GiB of a 24 GiB
machine was killed at its first checkpoint (RSS rose to 23.2 GiB after the last step);
streamed, the same run peaks at 17.5-17.8 GiB. :class:`StreamingCheckpointIO` lets
``torch.save`` write each storage to the file from its own memory. Atomicity does not depend
on the buffer: the caller
(:meth:`ldm.training.callbacks.SafetensorsCheckpoint.save_resume_state`) writes a temporary
file, fsyncs it and renames it over the old one; a full disk is the write's own ``OSError``
(which train.py reports in one line), not torch's zip-writer ``RuntimeError``.

Loads map the file (``torch.load(mmap=True, weights_only=True)``) instead of reading it into
memory: the weights are copied from the file's pages into the module's parameters, which
exist already, so the checkpoint's copy of them is page cache the kernel can drop, not a
second set of weights in the process's own memory. A run on the CPU copies the optimizer
state out of the mapping at once (``own_optimizer_state``): ``Optimizer.load_state_dict``
keeps tensors already of the parameter's device and dtype as they are, and moments left in
the mapping would keep the old ``resume.ckpt`` on disk, replaced but not freed, for the rest
of the run. On a GPU the optimizer moves them itself, and every rank of a node maps the same
file (one page cache) instead of reading its own copy. Measured on the full SD1 run above:
a resume peaked at 19.65 GiB of anonymous memory with Lightning's load, at 16.83 GiB mapped
(the training steps' own peak). Every load, mapped or not, local or remote, is
``weights_only=True`` whatever the caller asks: a resume checkpoint holds tensors and plain
values, and no pickled code is ever run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO


class StreamingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves stream to the file and whose local loads map it
    (remote paths: Lightning's).

    Args:
        own_optimizer_state: Copy the loaded optimizer state out of the mapped file (the run's
            parameters live in host memory, where the optimizer would keep them as they are).
    """

    def __init__(self, own_optimizer_state: bool = False) -> None:
        super().__init__()
        self.own_optimizer_state = own_optimizer_state

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = True,
    ) -> dict[str, Any]:
        del weights_only  # always True: never unpickle code
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        try:
            checkpoint = torch.load(
                os.fspath(path), map_location=map_location, weights_only=True, mmap=True
            )
        except (RuntimeError, OSError):  # torch's legacy (pre-zip) format, or a filesystem that
            # cannot map: read it as Lightning does (a damaged file raises there, as before)
            return super().load_checkpoint(path, map_location, weights_only=True)
        if self.own_optimizer_state:
            for optimizer_state in checkpoint.get("optimizer_states", ()):
                for state in optimizer_state.get("state", {}).values():
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor):
                            state[key] = value.clone()
        return checkpoint

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        with open(path, "wb") as f:  # through a Python file: a full disk raises its OSError
            try:
                torch.save(checkpoint, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write as a position
                if isinstance(e.__context__, OSError):  # mismatch; the write's own error is this
                    raise e.__context__ from None
                raise


def _is_local(path: Any) -> bool:
    """Whether ``path`` names a file on this machine (fsspec's ``file`` protocol)."""
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
