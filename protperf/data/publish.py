"""Atomic publishing of an output folder: build in ``<out>.partial``, rename when complete.

A run holds an exclusive ``flock`` on ``<out>.partial`` (released by the kernel even on
SIGKILL). A later run that finds an unlocked ``<out>.partial`` knows its writer died: it empties
it and starts over. ``<out>`` itself only ever appears complete, by one ``rename``; an existing
finished output (it has ``manifest.json``) is replaced only with ``overwrite=True``, and a
folder that is not a prepare-data output is never deleted.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from protperf.data.errors import DataError
from protperf.durable import replace_folder

MANIFEST = "manifest.json"
#: Where ``prepare-data`` writes, and the verbs that read a dataset look, by default.
DATA_DIR = Path("data")


def find_dataset(root: Path = DATA_DIR) -> Path:
    """The one prepared dataset (a folder with a manifest.json and a train.h5) directly under
    ``root``; raises DataError naming what was found when there is none or several."""
    found = sorted(
        path.parent
        for path in Path(root).glob(f"*/{MANIFEST}")
        if not path.parent.name.startswith(".") and (path.parent / "train.h5").is_file()
    )
    if not found:
        raise DataError(
            f"no --data given and no prepared dataset under {root}/: run "
            "`protperf prepare-data --release 2019_01` first, or pass --data DIR"
        )
    if len(found) > 1:
        names = ", ".join(str(path) for path in found)
        raise DataError(
            f"no --data given and {len(found)} prepared datasets under {root}/ ({names}): "
            "pass --data DIR"
        )
    return found[0]


def check_output(out: Path, *, overwrite: bool) -> None:
    """Raise :class:`DataError` unless ``out`` may be written (see the module docstring)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise DataError(
                f"{out} already holds a prepared dataset ({MANIFEST}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        return
    if any(out.iterdir()):
        raise DataError(
            f"{out} exists, is not empty and is not a prepare-data output; "
            "remove it or choose another --out"
        )


class StagingDir:
    """``<out>.partial``, locked; :meth:`publish` renames it to ``out``.

    Use as a context manager: on an exception the partial folder is removed (a SIGKILL leaves
    it, unlocked, for the next run to clear).
    """

    def __init__(self, out: Path, *, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.path = self.out.with_name(self.out.name + ".partial")
        self._fd: int | None = None

    def __enter__(self) -> Path:
        check_output(self.out, overwrite=self.overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(
                f"{self.path} is locked: another prepare-data run is writing {self.out}"
            ) from None
        self._fd = fd
        for child in self.path.iterdir():  # left by a run that was killed: start over
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return self.path

    def publish(self) -> Path:
        """Move the finished folder to ``out`` (replacing a previous output if allowed)."""
        check_output(self.out, overwrite=self.overwrite)  # absent, empty, or a replaceable output
        replace_folder(self.path, self.out)
        self._release()
        return self.out

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, kind, value, traceback) -> None:
        if self._fd is not None:  # not published: an error or an interruption
            shutil.rmtree(self.path, ignore_errors=True)
            self._release()
