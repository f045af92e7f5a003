"""Byte streams as iterators of chunks: HTTP with resume, local files, md5, gunzip, tar members.

Every stage takes and returns an iterator of ``bytes`` chunks, so a UniProt release is read as
``HTTP -> md5 -> gunzip -> tar member -> gunzip -> records`` while it downloads, without a copy
on disk. :func:`prefetch` runs a stage in a background thread: the network, md5 and both
gunzips (isal's igzip, or zlib) release the GIL, so on two cores decompression runs beside the
record scanner of the main thread.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import queue
import re
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TypeVar

from protperf import __version__
from protperf.data.errors import DownloadError, FormatError

try:  # isal's igzip decompresses gzip about 3x faster than zlib and releases the GIL.
    from isal import igzip_lib as _igzip_lib
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps the code working
    _igzip_lib = None

#: Bytes per read: large, so that each C call (recv, md5, inflate) runs long without the GIL.
CHUNK = 4 << 20
#: Largest output of one decompress call: 1 MB pieces stay in the CPU caches and in reused
#: memory (igzip runs about 30% faster than with 16 MB pieces), and a gzip bomb cannot fill RAM.
_MAX_OUT = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
T = TypeVar("T")


def is_url(spec: str) -> bool:
    """True for ``http://``, ``https://`` and ``ftp://`` addresses."""
    return re.match(r"^(https?|ftp)://", spec) is not None


def file_chunks(path: str | Path, *, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a local file, ``chunk_size`` at a time."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below, in the generator
    except OSError as error:
        raise FormatError(f"{path}: cannot open ({error.strerror})") from error
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


#: getaddrinfo errors that mean the name does not exist (EAI_AGAIN, "try again", is retried).
_HOST_NOT_FOUND = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _report_to_stderr(message: str) -> None:
    print(f"protperf: {message}", file=sys.stderr, flush=True)


def _cause(error: BaseException) -> BaseException:
    """The socket-level error: urllib's URLError wraps it in ``reason``."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return reason if isinstance(reason, BaseException) else error


def _reason(error: BaseException) -> str:
    cause = _cause(error)
    return str(cause) or type(cause).__name__


def _host_not_found(error: BaseException) -> bool:
    cause = _cause(error)
    return isinstance(cause, socket.gaierror) and cause.errno in _HOST_NOT_FOUND


def download_chunks(
    url: str,
    *,
    start: int = 0,
    size: int | None = None,
    retries: int = 8,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = CHUNK,
    sleep: Callable[[float], None] = time.sleep,
    report: Callable[[str], None] = _report_to_stderr,
) -> Iterator[bytes]:
    """The bytes of ``url`` from offset ``start``, resuming dropped connections.

    A connection that drops (reset, timeout, or a body shorter than announced) is reopened with
    ``Range: bytes=<reached>-`` after ``retry_wait * 2**k`` seconds (k = failures in a row, the
    wait capped at 60 s); after ``retries`` failures in a row without progress it gives up with a
    :class:`DownloadError` naming the URL and the byte reached. HTTP 4xx errors (404 ...) fail at
    once, and so does a host name that does not resolve before any byte arrived (a mistyped
    mirror, or no network: retrying would only wait minutes in silence); once bytes have come,
    it is retried like any other failure (a laptop's network dropping mid-download). Each retry
    is announced through ``report`` (default: a line on stderr) with the error and the wait.
    ``size``, when known (RELEASE.metalink), is the total length; otherwise the server's
    Content-Length / Content-Range is trusted. A server that ignores Range is handled by skipping.
    """
    position, failures, total = start, 0, size
    while total is None or position < total:
        headers = {"User-Agent": f"protperf/{__version__}"}
        if position:
            headers["Range"] = f"bytes={position}-"
        error: BaseException | None = None
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            )
        except urllib.error.HTTPError as http_error:
            if http_error.code == 416 and total is None and position:
                return  # asked past the end of a file whose size we did not know: done
            if 400 <= http_error.code < 500 and http_error.code not in (408, 429):
                raise DownloadError(
                    f"{url}: HTTP {http_error.code} {http_error.reason}"
                ) from http_error
            error = http_error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as open_error:
            if position == start and _host_not_found(open_error):
                host = urllib.parse.urlsplit(url).hostname
                raise DownloadError(
                    f"{url}: cannot resolve the host {host!r} ({_reason(open_error)}): check the "
                    "URL, or the network connection; nothing was downloaded"
                ) from open_error
            error = open_error
        else:
            with response:
                skip = 0
                if position and response.status != 206:
                    skip = position  # the server ignored Range: read and drop what we have
                elif position:
                    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                    if not match or int(match.group(1)) != position:
                        raise DownloadError(
                            f"{url}: asked for bytes from {position}, server answered "
                            f"{response.headers.get('Content-Range')!r}"
                        )
                if total is None:
                    total = _total_length(response, position if not skip else 0)
                try:
                    while True:
                        chunk = response.read(chunk_size)
                        if not chunk:
                            break
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        position += len(chunk)
                        failures = 0
                        yield chunk
                except (OSError, http.client.HTTPException) as read_error:
                    error = read_error
            if total is None and error is None:
                return  # no announced length: the end of the body is the end of the file
            if total is not None and position >= total:
                if position > total:
                    raise DownloadError(f"{url}: got {position} bytes, expected {total}")
                return
            error = error or ConnectionError(f"connection closed at byte {position}")
        failures += 1
        if failures > retries:
            raise DownloadError(
                f"{url}: giving up after {failures} failed attempts at byte {position}: {error}"
            ) from error
        wait = min(60.0, retry_wait * 2 ** (failures - 1))
        report(
            f"{url}: {_reason(error)} at byte {position}; retrying in {wait:g} s "
            f"(attempt {failures + 1} of {retries + 1})"
        )
        sleep(wait)


def _total_length(response: http.client.HTTPResponse, position: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    match = re.match(r"bytes \d+-\d+/(\d+)", content_range)
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return position + int(length) if length is not None else None


def fetch_bytes(url: str, *, retries: int = 8, retry_wait: float = 1.0) -> bytes:
    """A small file (e.g. RELEASE.metalink) in one piece; see :func:`download_chunks`."""
    return b"".join(download_chunks(url, retries=retries, retry_wait=retry_wait))


class Meter:
    """Counts the bytes of a chunk iterator and computes their md5 as they pass."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.bytes = 0
        self.md5 = hashlib.md5()
        self.finished = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.md5.update(chunk)
            self.bytes += len(chunk)
            yield chunk
        self.finished = True


class _ZlibDecompressor:
    """zlib's gzip decompressor behind the interface of isal's IgzipDecompressor (and bz2's)."""

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(31)
        self._pending = b""
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    @property
    def unused_data(self) -> bytes:
        return self._zlib.unused_data

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._zlib.decompress(self._pending + bytes(data), max_length)
        self._pending = self._zlib.unconsumed_tail
        self.needs_input = not self._pending and (len(out) < max_length or self._zlib.eof)
        return out


def _gzip_decompressor():
    if _igzip_lib is not None:
        return _igzip_lib.IgzipDecompressor(flag=_igzip_lib.DECOMP_GZIP)
    return _ZlibDecompressor()  # pragma: no cover - isal is a dependency


_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (zlib.error, EOFError, ValueError)
if _igzip_lib is not None:
    _DECOMPRESS_ERRORS += (_igzip_lib.IsalError,)


def gunzip_chunks(chunks: Iterable[bytes], *, source: str) -> Iterator[bytes]:
    """Decompress a gzip stream (several concatenated members allowed) chunk by chunk.

    Raises :class:`FormatError` naming ``source`` for corrupt data and for a stream that ends
    before the end of its last member (a truncated download or file).
    """
    decompressor = _gzip_decompressor()
    in_member, consumed = False, 0
    for chunk in chunks:
        consumed += len(chunk)
        data = chunk
        while True:
            if not in_member:
                if not data:
                    break
                if data[0] == 0 and bytes(data).count(0) == len(data):
                    break  # zero padding after the last member (some tools write it)
                if bytes(data[:2]) != _GZIP_MAGIC[: len(data[:2])]:
                    raise FormatError(f"{source}: not gzip data after {consumed - len(data)} bytes")
                in_member = True
            try:
                out = decompressor.decompress(data, _MAX_OUT)
            except _DECOMPRESS_ERRORS as error:
                raise FormatError(f"{source}: corrupt gzip data ({error})") from error
            if out:
                yield out
            data = b""
            if decompressor.eof:
                data = decompressor.unused_data
                decompressor = _gzip_decompressor()
                in_member = False
            elif decompressor.needs_input:
                break
    if in_member:
        raise FormatError(
            f"{source}: truncated gzip stream (it ends after {consumed} compressed bytes, "
            "inside a member)"
        )


class ChunkReader(io.RawIOBase):
    """A read-only file object over an iterator of chunks (for :mod:`tarfile`)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:  # type: ignore[override]
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = memoryview(chunk)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._buffer = memoryview(chunk)
        if size >= len(self._buffer):
            data, self._buffer = self._buffer.tobytes(), memoryview(b"")
            return data
        data, self._buffer = self._buffer[:size].tobytes(), self._buffer[size:]
        return data

    def drain(self) -> None:
        """Read everything left, so that the stages before see the whole stream (md5)."""
        self._buffer = memoryview(b"")
        for _ in self._chunks:
            pass


class _Cursor:
    """Reads exact byte counts from a chunk iterator, as memoryview pieces (no copies)."""

    def __init__(self, chunks: Iterable[bytes], source: str) -> None:
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")
        self._source = source
        self.position = 0

    def pieces(self, size: int) -> Iterator[memoryview]:
        while size > 0:
            if not self._buffer:
                chunk = next(self._chunks, None)
                if chunk is None:
                    raise FormatError(
                        f"{self._source}: truncated tar archive (it ends at byte {self.position})"
                    )
                self._buffer = memoryview(chunk)
            piece = self._buffer[:size]
            self._buffer = self._buffer[len(piece) :]
            size -= len(piece)
            self.position += len(piece)
            yield piece

    def read(self, size: int) -> bytes:
        return b"".join(self.pieces(size))

    def drain(self) -> None:
        self._buffer = memoryview(b"")
        for _ in self._chunks:
            pass


def _pax_fields(data: bytes) -> dict[str, str]:
    fields, position = {}, 0
    while position < len(data):
        match = re.match(rb"(\d+) ", data[position:])
        if not match:
            break
        length = int(match.group(1))
        key, _, value = data[position + match.end() : position + length - 1].partition(b"=")
        fields[key.decode()] = value.decode("utf-8", "replace")
        position += length
    return fields


def tar_member_chunks(chunks: Iterable[bytes], member: str, *, source: str) -> Iterator[bytes]:
    """The bytes of the tar member whose file name is ``member``, from a tar stream.

    Headers are parsed with :meth:`tarfile.TarInfo.frombuf` (ustar, GNU base-256 sizes); GNU
    long names and pax ``path``/``size`` records are applied. The member's data is passed on
    as memoryviews of the incoming chunks, without copying. The rest of the archive is read to
    its end afterwards, so that an md5 measured upstream covers the whole download. Raises
    :class:`FormatError` if the archive is corrupt or truncated, or has no such member.
    """
    cursor = _Cursor(chunks, source)
    names: list[str] = []
    found = False
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = cursor.read(512)
        if header.count(0) == 512:
            break  # end-of-archive marker
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            raise FormatError(
                f"{source}: corrupt tar header at byte {cursor.position - 512} ({error})"
            ) from error
        size = int(pax.get("size", info.size))
        padded = -(-size // 512) * 512
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            data = cursor.read(padded)[:size]
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            elif info.type == tarfile.XHDTYPE:
                pax = _pax_fields(data)
            continue
        name = pax.get("path") or long_name or info.name
        long_name, pax = None, {}
        names.append(name)
        if not found and info.isfile() and PurePosixPath(name).name == member:
            found = True
            yield from cursor.pieces(size)
            cursor.read(padded - size)
        else:
            for _ in cursor.pieces(padded):
                pass
    if not found:
        raise FormatError(f"{source}: the archive has no member {member} (members: {names})")
    cursor.drain()


def peek(chunks: Iterable[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes (fewer at the end of the stream) and the unchanged stream."""
    iterator = iter(chunks)
    head: list[bytes] = []
    have = 0
    while have < size:
        chunk = next(iterator, None)
        if chunk is None:
            break
        head.append(chunk)
        have += len(chunk)

    def replay() -> Iterator[bytes]:
        yield from head
        yield from iterator

    return b"".join(head)[:size], replay()


def prefetch(items: Iterable[T], *, depth: int = 32, name: str = "prefetch") -> Iterator[T]:
    """Run ``items`` in a daemon thread, handing over at most ``depth`` items ahead.

    Exceptions of the producer are re-raised in the consumer. Closing the returned generator
    (or an exception in the consumer) stops the producer at its next item.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            put((done, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None and stop.is_set():
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
