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

A full disk is bad input like any other: :class:`DiskFullError` names the output, and
:func:`reporting_full_disk` turns whatever a writer raised on a full disk (an ``OSError`` with
ENOSPC, or torch's, h5py's and safetensors' own words for it) into one. HDF5 cannot close a file
whose write failed (it crashes the process at exit, or at once), so :func:`h5_file` writes HDF5
through a file object that keeps such failures from it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protperf.errors import InputError

#: Temporary files being written by :func:`atomic_file` in this process.
_UNFINISHED: set[Path] = set()
#: How writers that do not raise an ``OSError`` say that the disk is full.
_FULL_DISK_WORDS = re.compile(r"No space left on device|errno = 28\b|os error 28\b|StorageFull")


class DiskFullError(InputError):
    """The file system that holds an output has no space left (or the user's quota is used up)."""

    def __init__(self, path: str | Path, *, quota: bool = False, then: str | None = None) -> None:
        self.path = Path(path)
        what = "the disk quota is used up" if quota else "the disk is full"
        then = then or (
            "nothing was replaced or left half-written: free some space (or write elsewhere) "
            "and run the command again"
        )
        super().__init__(f"{path}: {what}; {then}")


def full_disk_errno(error: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when ``error``, or an error it chains, says the disk is full; else None.
    Beside ``OSError`` it reads the messages of the writers that lose the errno: HDF5's
    ("errno = 28"), safetensors' ("os error 28") and torch.save's, whose context is the
    ``OSError`` of the file object it was given."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return errno.ENOSPC
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error.errno
        if _FULL_DISK_WORDS.search(str(error)):
            return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def reporting_full_disk(path: str | Path, *, then: str | None = None) -> Iterator[None]:
    """Raise :class:`DiskFullError` naming ``path`` (and saying ``then``, what to do) for
    anything the block raises because the disk is full; other errors pass unchanged."""
    try:
        yield
    except DiskFullError as error:
        if then is None:
            raise
        raise DiskFullError(error.path, then=then) from None
    except Exception as error:
        code = full_disk_errno(error)
        if code is None:
            raise
        raise DiskFullError(path, quota=code == errno.EDQUOT, then=then) from None


def discard_unfinished() -> None:
    """Delete the temporary files this process is writing (a process about to exit without
    unwinding: they would wait for the next run to clean them up)."""
    for tmp in list(_UNFINISHED):
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    Temporaries that killed writers left beside ``out`` are removed first. A full disk is a
    :class:`DiskFullError` naming ``out``.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    remove_stale_temporaries(out.parent, out.name)
    tmp = temporary_name(out)
    _UNFINISHED.add(tmp)
    try:
        with reporting_full_disk(out):
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
    finally:
        _UNFINISHED.discard(tmp)


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


class _DiskFile(io.RawIOBase):
    """The file HDF5 writes through (h5py's ``fileobj`` driver): a write that the disk has no
    room for is remembered, not raised, so that HDF5 goes on to close the file normally; the
    caller then raises. Reads of what was never written come back as zeros."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.failure: OSError | None = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, default_file_mode())
        self._position = self._end = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._end}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        size = self._end - self._position if size < 0 else size
        data = os.pread(self._fd, size, self._position) if size > 0 else b""
        self._position += size
        return data + bytes(size - len(data))

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.failure is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._position + done)
            except OSError as error:
                self.failure = error
        self._position += len(view)
        self._end = max(self._end, self._position)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.failure is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as error:
                self.failure = error
        self._end = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    def check(self) -> None:
        """Raise the ``OSError`` of the first write that failed, naming the file."""
        if self.failure is not None:
            raise OSError(self.failure.errno, self.failure.strerror, str(self.path))


def create_h5(path: str | Path) -> Any:
    """``h5py.File(path, "w")`` whose writes a full disk cannot break (see :class:`_DiskFile`);
    close it with :func:`close_h5`, which raises ``OSError`` (ENOSPC, naming ``path``) if a
    write failed. :func:`check_writes` raises the same at any time, to stop a long loop early."""
    import h5py

    raw = _DiskFile(Path(path))
    try:
        f = h5py.File(raw, "w")
    except BaseException:
        raw.close()
        raise
    f._protperf_disk_file = raw
    return f


def check_writes(f: Any) -> None:
    """Raise ``OSError`` naming the file when a write into ``f`` (from :func:`create_h5`) failed."""
    raw = getattr(f, "_protperf_disk_file", None)
    if raw is not None:
        raw.check()


def close_h5(f: Any) -> None:
    """Close ``f`` (from :func:`create_h5`); raise ``OSError`` if any write into it failed."""
    raw = getattr(f, "_protperf_disk_file", None)
    try:
        f.close()
    finally:
        if raw is not None:
            raw.close()
    if raw is not None:
        raw.check()


@contextlib.contextmanager
def h5_file(path: str | Path) -> Iterator[Any]:
    """:func:`create_h5` as a context manager: the file is closed however the block ends, and
    a failed write raises ``OSError`` (ENOSPC, naming ``path``) once the block is done."""
    f = create_h5(path)
    try:
        yield f
        check_writes(f)
    except BaseException:
        with contextlib.suppress(OSError):
            close_h5(f)
        raise
    close_h5(f)
