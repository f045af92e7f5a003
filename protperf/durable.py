"""Durable publishing: flush written bytes to disk before the rename that publishes them.

A rename is atomic, but without ``fsync`` a power cut soon after it can leave the new name
pointing at a file whose data never reached the disk. Every atomic output in protperf (prepare's
HDF5 folder, exports, embeddings, generated FASTA) calls :func:`sync_tree` on the finished
temporary path before renaming it, and :func:`sync_parent` after, so that both the data and the
new name survive a crash; :func:`replace_folder` does both for a finished folder, and
:func:`recover_folder` finishes what a killed one left behind.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | Path) -> None:
    """fsync a file, or every file under a folder and the folders themselves."""
    path = Path(path)
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            _fsync(child)
    _fsync(path)


def sync_parent(path: str | Path) -> None:
    """fsync the folder holding ``path`` (makes a rename into it durable)."""
    _fsync(Path(path).resolve().parent)


def replace_folder(new: str | Path, out: str | Path) -> Path:
    """Publish the finished folder ``new`` as ``out``, durably, replacing an earlier ``out``
    folder (moved aside to ``.<out>.<pid>.old``, then deleted once ``new`` is in place);
    returns ``out``."""
    new, out = Path(new), Path(out)
    sync_tree(new)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    recover_folder(out)
    old = out.with_name(f".{out.name}.{os.getpid()}.old") if out.exists() else None
    if old is not None:
        out.rename(old)
    new.rename(out)
    sync_parent(out)
    if old is not None:
        shutil.rmtree(old)
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_folder(out: str | Path) -> list[Path]:
    """Clean up after a process killed while publishing ``out``; returns what it removed.

    Looks at ``.<out>.<pid>.old`` (an earlier ``out`` moved aside by :func:`replace_folder`)
    and ``.<out>.<pid>.partial`` (an unfinished export) whose process is gone. If ``out`` is
    missing (killed between the two renames), the newest such ``.old`` becomes ``out`` again,
    so that nothing already published is lost; every other one is deleted. Folders of live
    processes are left alone.
    """
    out = Path(out)
    prefix = f".{out.name}."
    stale: dict[str, list[Path]] = {".old": [], ".partial": []}
    for suffix, found in stale.items():
        for path in out.parent.glob(f"{glob.escape(prefix)}*{suffix}"):
            pid = path.name[len(prefix) : -len(suffix)]
            if pid.isdigit() and not _process_alive(int(pid)):
                found.append(path)
    if not out.exists() and stale[".old"]:
        newest = max(stale[".old"], key=lambda path: path.stat().st_mtime)
        newest.rename(out)
        sync_parent(out)
        stale[".old"].remove(newest)
    removed = stale[".old"] + stale[".partial"]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
