"""Open one input (a UniProt release archive, a local file or a URL) as decompressed bytes.

Whatever the input, :func:`open_source` returns a :class:`Source` whose ``chunks`` are the
flat-file or FASTA bytes: gzip is recognised by its magic bytes and a tar archive by its header
(its ``uniprot_trembl.dat.gz`` member is read). Threads: reading + md5 + the first gunzip run in
one, the tar member's gunzip in another, so that the caller's thread only parses.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protperf.data.errors import ChecksumError, DataError
from protperf.data.stream import (
    Meter,
    download_chunks,
    file_chunks,
    gunzip_chunks,
    is_url,
    peek,
    prefetch,
    tar_member_chunks,
)
from protperf.data.uniprot import TREMBL_MEMBER

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Source:
    """An opened input: iterate ``chunks`` (decompressed), then call :meth:`verify`.

    ``size`` (bytes before decompression, when known) and ``meter.bytes`` give the progress.
    """

    name: str
    chunks: Iterator[bytes]
    meter: Meter
    size: int | None = None
    md5: str | None = None
    member: str | None = None
    _keep: tuple[Path, Path] | None = field(default=None, repr=False)
    _tee: io.BufferedIOBase | None = field(default=None, repr=False)

    def verify(self) -> dict:
        """After the whole stream was read: check size and md5, publish a kept download.

        Raises :class:`ChecksumError` on a mismatch (and deletes a kept partial download, which
        is corrupt). Returns the source's manifest entry.
        """
        self.close()
        actual = self.meter.md5.hexdigest()
        problem = None
        if self.size is not None and self.meter.bytes != self.size:
            problem = f"size {self.meter.bytes} bytes, RELEASE.metalink says {self.size}"
        elif self.md5 is not None and actual != self.md5:
            problem = f"md5 {actual}, RELEASE.metalink says {self.md5}"
        if problem:
            if self._keep is not None:
                self._keep[0].unlink(missing_ok=True)
            raise ChecksumError(f"{self.name}: checksum error: {problem}; nothing was published")
        if self._keep is not None:
            self._keep[0].replace(self._keep[1])
        return self.entry(verified=self.md5 is not None)

    def entry(self, *, verified: bool) -> dict:
        """The manifest's record of this source."""
        return {
            "url": self.name,
            "member": self.member,
            "bytes": self.meter.bytes,
            "md5": self.meter.md5.hexdigest() if self.meter.finished else None,
            "md5_expected": self.md5,
            "md5_verified": verified,
        }

    def close(self) -> None:
        """Stop the reader threads and close a kept download."""
        with contextlib.suppress(Exception):
            self.chunks.close()  # type: ignore[attr-defined]
        if self._tee is not None:
            self._tee.close()
            self._tee = None


def open_source(
    spec: str,
    *,
    size: int | None = None,
    md5: str | None = None,
    member: str | None = None,
    keep_download: Path | None = None,
    retries: int = 8,
    retry_wait: float = 1.0,
) -> Source:
    """Open a local path or URL; ``size`` and ``md5`` (from a metalink) are checked by verify().

    ``member`` names the tar member to read (default ``uniprot_trembl.dat.gz``) when the input
    is a tar archive. With ``keep_download`` (a folder), a URL is also saved there as it
    streams (``<name>.part``, renamed to ``<name>`` once its md5 is verified); a later run reads
    the saved file, or resumes the partial one over HTTP from where it stopped.
    """
    keep: tuple[Path, Path] | None = None
    tee = None
    if not is_url(spec):
        if not Path(spec).is_file():
            raise DataError(f"{spec}: no such file")
        raw: Iterator[bytes] = file_chunks(spec)
        total = Path(spec).stat().st_size if size is None else size
    elif keep_download is None:
        raw = download_chunks(spec, size=size, retries=retries, retry_wait=retry_wait)
        total = size
    else:
        raw, keep, tee = _kept_download(spec, size, keep_download, retries, retry_wait)
        total = size
    meter = Meter(raw)
    chunks = _decompressed(iter(meter), name=spec, member=member)
    source = Source(spec, chunks, meter, total, md5, member, keep, tee)
    return source


def _kept_download(
    url: str, size: int | None, folder: Path, retries: int, retry_wait: float
) -> tuple[Iterator[bytes], tuple[Path, Path] | None, io.BufferedIOBase | None]:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / url.rstrip("/").rsplit("/", 1)[-1]
    part = final.with_name(final.name + ".part")
    if final.is_file() and (size is None or final.stat().st_size == size):
        return file_chunks(final), None, None  # md5 is still checked by verify()
    start = part.stat().st_size if part.is_file() else 0
    if size is not None and start > size:
        part.unlink()
        start = 0
    tee = open(part, "ab")  # noqa: SIM115 - closed by Source.close()
    local = file_chunks(part) if start else iter(())
    remote = download_chunks(url, start=start, size=size, retries=retries, retry_wait=retry_wait)

    def chunks() -> Iterator[bytes]:
        yield from local  # what an earlier run saved is read, not downloaded again
        for chunk in remote:
            tee.write(chunk)
            yield chunk

    return chunks(), (part, final), tee


def _decompressed(raw: Iterator[bytes], *, name: str, member: str | None) -> Iterator[bytes]:
    head, raw = peek(raw, 2)
    stage: Iterator[bytes] = raw
    if head == _GZIP_MAGIC:
        stage = prefetch(gunzip_chunks(raw, source=name), name="protperf-gunzip")
    head, stage = peek(stage, 512)
    if len(head) == 512 and head[257:262] == b"ustar":
        wanted = member or TREMBL_MEMBER
        inner = tar_member_chunks(stage, wanted, source=name)
        label = f"{name} ({wanted})"
        head, inner = peek(inner, 2)
        if head == _GZIP_MAGIC:
            # A deep queue (about 96 MB): decompression runs ahead while the caller starts up.
            return prefetch(
                gunzip_chunks(inner, source=label), depth=96, name="protperf-gunzip-member"
            )
        return prefetch(inner, name="protperf-tar")
    return stage
