"""Durable publishing: outputs are checked before any work, written beside their final name,
flushed to disk, and renamed into place.

A rename is atomic, but without ``fsync`` a power cut soon after it can leave the new name
pointing at a file whose data never reached the disk. Every atomic output in protperf (prepare's
HDF5 folder, exports, checkpoints, embeddings, generated FASTA) calls :func:`sync_tree` on the
finished temporary path before renaming it, and :func:`sync_parent` after, so that both the data
and the new name survive a crash. :func:`atomic_file` does this for one file,
:func:`replace_folder` for a finished folder, and :func:`recover_folder` finishes what a killed
one left behind. :func:`check_output_file` and :func:`check_output_folder` say what is wrong
with an output path before a verb starts its work.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from protperf.errors import InputError


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


def temporary_name(out: str | Path, pid: int | None = None) -> Path:
    """``.<name>.<pid>.tmp`` beside ``out``: where :func:`atomic_file` writes before renaming."""
    out = Path(out)
    return out.with_name(f".{out.name}.{os.getpid() if pid is None else pid}.tmp")


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temporaries (see :func:`temporary_name`) in ``folder`` whose process is gone
    (writers killed before their rename), of the file ``name`` only when given; returns them.
    Those of live processes are left alone."""
    pattern = f".{glob.escape(name)}.*.tmp" if name is not None else ".*.tmp"
    removed = []
    for path in Path(folder).glob(pattern):
        pid = path.name[: -len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_file(out: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; when the block completes, flush it to disk and
    rename it onto ``out``; on any error or interrupt delete it. ``out`` only ever holds a whole
    file: the previous one or the new one.

    Without ``overwrite`` an ``out`` that appeared while the block ran is kept and
    :class:`InputError` raised (the new file is published with a hard link, which never
    replaces). A symbolic link is followed: the file it points to is replaced, the link kept.
    Temporaries that killed writers left beside ``out`` are removed first.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    remove_stale_temporaries(out.parent, out.name)
    tmp = temporary_name(out)
    try:
        yield tmp
        sync_tree(tmp)
        if overwrite:
            os.replace(tmp, out)
        else:
            _publish_without_replacing(tmp, out)
        sync_parent(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish_without_replacing(tmp: Path, out: Path) -> None:
    appeared = InputError(
        f"{out}: the file appeared while this run was writing it; pass --overwrite to replace it"
    )
    try:
        os.link(tmp, out)  # fails if ``out`` exists: no window in which it could be replaced
    except FileExistsError:
        raise appeared from None
    except OSError:  # a file system without hard links
        if out.exists():
            raise appeared from None
        os.replace(tmp, out)
        return
    tmp.unlink()


def default_file_mode() -> int:
    """The permission bits a new file gets here: 0o666 less the process's umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:  # read without changing it (Linux)
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the only way to read it is to set it, then restore it
    os.umask(mask)
    return mask


def check_output_file(out: str | Path, *, overwrite: bool, option: str = "-o") -> None:
    """Raise :class:`InputError` (naming ``option`` and the path) unless ``out`` can be written:
    it is not a folder, it does not exist unless ``overwrite``, and its folder exists and takes
    a new file (tried for real: permissions, read-only or special file systems). Called before
    any work, so that a wrong path fails at once rather than after the computing."""
    out = Path(out)
    where = f"{option} {out}"
    if out.is_dir():
        raise InputError(f"{where}: is a folder; give a file name")
    if out.exists() and not out.is_file():  # renaming onto /dev/null would replace the device
        raise InputError(f"{where}: not a regular file (a device or a pipe); give a file name")
    if out.exists() and not overwrite:
        raise InputError(f"{where}: the file exists; pass --overwrite to replace it")
    folder = out.parent
    if not folder.exists():
        raise InputError(f"{where}: folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{where}: {folder} is not a folder")
    probe = temporary_name(out)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise InputError(f"{where}: cannot write in {folder} ({error.strerror})") from error
    probe.unlink()


def check_output_folder(folder: str | Path, *, option: str) -> None:
    """Raise :class:`InputError` (naming ``option`` and the path) unless ``folder`` is, or can be
    created as, a folder that takes new files; tried for real, and nothing is left behind."""
    folder = Path(folder)
    where = f"{option} {folder}"
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{where}: exists and is not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{where}: {existing} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".protperf-probe-", dir=existing)).rmdir()
    except OSError as error:
        raise InputError(f"{where}: cannot write in {existing} ({error.strerror})") from error
