"""Lightning checkpoints written as every protperf output is: beside their final name, flushed
to disk, then renamed into place, so that ``last.ckpt`` is always a whole checkpoint (the
previous one or the new one) whenever the process is killed; and read without unpickling code,
an unreadable one being a one-line error naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from protperf.durable import atomic_file
from protperf.export import LOAD_ERRORS, unreadable_checkpoint


class DurableCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.<pid>.tmp`` beside the checkpoint, fsync, rename.

    Lightning's own writer renames a file written in the system's temporary folder, which is a
    copy (not atomic) when that folder is on another file system, and never flushes it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to the local file ``path`` whole, or leave the previous one."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "wb") as handle:
            # A file object, not a path: torch's own writer loses the errno of a full disk,
            # while a Python file raises it (the context of torch's error).
            torch.save(checkpoint, handle)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Lightning's loading; a damaged or foreign file raises an InputError naming it."""
        try:
            return super().load_checkpoint(path, map_location, weights_only)
        except LOAD_ERRORS as error:
            raise unreadable_checkpoint(path, error) from None
