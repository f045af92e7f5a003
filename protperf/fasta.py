"""User FASTA files in and out, validated against the model's amino-acid alphabet, in one pass.

:func:`scan_fasta` streams a plain or gzipped FASTA file (detected from the content, not the
name), record by record, holding one record at a time, and gives each record's byte offset in
the (decompressed) file, so that a later pass can start reading at any record
(:class:`FastaReader`). :func:`read_fasta` is the whole list. Records read as Biopython reads
them; sequences are upper-case residue letters with a trailing ``*`` (stop codon) removed.
Anything a model cannot read raises :class:`FastaError` naming the file and the record: a
missing, empty, binary or non-FASTA file, a truncated gzip, a record without an id or without
a sequence, letters outside the vocabulary (``ACDEFGHIKLMNPQRSTVWY`` and ``BOUXZ``, any case),
and duplicate ids. With ``skip_invalid=True`` records without a sequence or with invalid letters
are skipped and returned with the reason instead.
"""

from __future__ import annotations

import array
import gzip
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from protperf.errors import InputError
from protperf.tokenizer import RESIDUES

ALPHABET = frozenset(RESIDUES)
MAX_LISTED = 10  # problems spelled out in one error message
CHUNK_BYTES = 1 << 20  # read size: memory is one chunk plus the longest record
_ALPHABET_BYTES = RESIDUES.encode("ascii")
_WHITESPACE = b" \t\r\n\v\f"


class FastaError(InputError):
    """A FASTA file that cannot be used; the message names the file and the record."""


@dataclass(frozen=True)
class FastaRecord:
    """One FASTA record: ``id`` (first word of the header), full header, residues (upper case)."""

    id: str
    description: str
    sequence: str


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out by ``skip_invalid``: its 1-based number, id and the reason."""

    number: int
    id: str
    reason: str


@dataclass(frozen=True)
class ScannedRecord:
    """A record as :func:`scan_fasta` meets it: its 1-based number, the byte offset of its ``>``
    in the (decompressed) file, and the record, or why it was skipped."""

    number: int
    offset: int
    record: FastaRecord | None
    skipped: SkippedRecord | None = None


def _open_binary(path: Path) -> BinaryIO:
    with open(path, "rb") as raw:
        magic = raw.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _name(number: int, record_id: str) -> str:
    return f"record {number} ({record_id!r})" if record_id else f"record {number}"


def _problem(sequence: str) -> str | None:
    """Why a (whitespace-free, upper-case, stop-stripped) sequence is unusable, or None."""
    if not sequence:
        return "empty sequence"
    bad = sorted(set(sequence) - ALPHABET)
    if not bad:
        return None
    first = min(sequence.index(char) for char in bad) + 1
    letters = ", ".join(repr(char) for char in bad[:8]) + (", ..." if len(bad) > 8 else "")
    return (
        f"characters that are not amino-acid letters: {letters} (first at residue {first}; "
        f"accepted: {RESIDUES[:20]} and {RESIDUES[20:]}, any case, a final '*')"
    )


def _split_records(handle: BinaryIO, offset: int) -> Iterator[tuple[int, bytes]]:
    """(offset of the ``>``, the record's bytes after it) for each record from ``offset``,
    where a record starts; each chunk is searched once, so a long record costs linear time."""
    handle.seek(offset)
    buffer = bytearray()
    base, start, searched = offset, 0, 1  # buffer[0] is at ``base``; a record begins at start
    while chunk := handle.read(CHUNK_BYTES):
        if start:
            del buffer[:start]
            base, searched, start = base + start, searched - start, 0
        buffer += chunk
        while (cut := buffer.find(b"\n>", searched)) >= 0:
            yield base + start, bytes(buffer[start + 1 : cut + 1])
            start, searched = cut + 1, cut + 2
        searched = max(len(buffer) - 1, searched)
    if len(buffer) > start:
        yield base + start, bytes(buffer[start + 1 :])


def _parse(path: Path, data: bytes) -> tuple[str, str, bytes]:
    """(id, description, residues: upper case, whitespace and a final ``*`` removed)."""
    title_line, _, lines = data.partition(b"\n")
    try:
        description = title_line.decode("utf-8").rstrip()
    except UnicodeDecodeError as error:
        raise FastaError(
            f"{path}: not a FASTA text file (binary content: {error.reason})"
        ) from error
    words = description.split(None, 1)
    sequence = lines.translate(None, _WHITESPACE).upper()
    if sequence.endswith(b"*"):
        sequence = sequence[:-1]
    return (words[0] if words else ""), description, sequence


def _check(path: Path, number: int, record_id: str, sequence: bytes) -> str | None:
    """Why the residues are unusable, or None; binary content is a :class:`FastaError`."""
    if sequence and not sequence.translate(None, _ALPHABET_BYTES):
        return None
    try:
        text = sequence.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FastaError(
            f"{path}: not a FASTA text file (binary content in {_name(number, record_id)}: "
            f"{error.reason})"
        ) from error
    return _problem(text)


class FastaReader:
    """Records read again from the offsets :func:`scan_fasta` gave, with one open handle.

    Reading goes on from where the last call stopped when the next offset asked for is the next
    record (one process reading consecutive shards), or skips ahead to it (a gzipped file is
    decompressed through the gap). Only an offset behind the last one read starts over: a
    gzipped file then decompresses again from its start, so ask for offsets in file order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = _open_binary(self.path)
        self._split: Iterator[tuple[int, bytes]] = iter(())
        self._next: tuple[int, bytes] | None = None  # the split's next record, not yet used

    def records(self, offset: int, count: int) -> list[FastaRecord]:
        """The valid records among the ``count`` records from the one at ``offset`` (invalid
        ones, already reported by the scan, are left out)."""
        self._go_to(offset)
        records: list[FastaRecord] = []
        for _ in range(count):
            if self._next is None:
                break
            record_id, description, sequence = _parse(self.path, self._next[1])
            if record_id and _check(self.path, 0, record_id, sequence) is None:
                records.append(FastaRecord(record_id, description, sequence.decode("ascii")))
            self._next = next(self._split, None)
        return records

    def _go_to(self, offset: int) -> None:
        """Make the record at ``offset`` the next one."""
        if self._next is not None and self._next[0] <= offset < self._handle.tell():
            while self._next is not None and self._next[0] < offset:  # in the chunk read ahead
                self._next = next(self._split, None)
            if self._next is not None and self._next[0] == offset:
                return
        self._split = _split_records(self._handle, offset)
        self._next = next(self._split, None)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> FastaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scan_fasta(path: str | Path, *, skip_invalid: bool = False) -> Iterator[ScannedRecord]:
    """Stream and validate a FASTA file (plain or gzipped), one record held at a time.

    Yields every record in file order (a skipped one with its reason, with ``skip_invalid``).
    Raises :class:`FastaError` as described in the module docstring; errors that need the
    whole file (invalid records without ``skip_invalid``, duplicate ids, nothing usable) are
    raised after the last record, so a caller that must validate before writing anything
    consumes the whole scan first. Memory: one chunk, the longest record and 8 bytes per id.
    """
    path = Path(path)
    if not path.exists():
        raise FastaError(f"{path}: no such file")
    if not path.is_file():
        raise FastaError(f"{path}: not a file")
    id_hashes = array.array("q")
    problems: list[str] = []
    valid = skipped = number = 0
    last = ""
    try:
        with _open_binary(path) as handle:
            first = handle.read(1)
            if first and first != b">":
                raise FastaError(
                    f"{path}: not a FASTA file (the first line does not start with '>')"
                )
            for number, (offset, data) in enumerate(_split_records(handle, 0), start=1):
                record_id, description, sequence = _parse(path, data)
                last = record_id
                if not record_id:
                    raise FastaError(f"{path}: record {number} has no id (a bare '>' line)")
                id_hashes.append(hash(record_id))
                problem = _check(path, number, record_id, sequence)
                if problem is None:
                    valid += 1
                    record = FastaRecord(record_id, description, sequence.decode("ascii"))
                    yield ScannedRecord(number, offset, record)
                elif skip_invalid:
                    skipped += 1
                    yield ScannedRecord(
                        number, offset, None, SkippedRecord(number, record_id, problem)
                    )
                else:
                    problems.append(f"{_name(number, record_id)}: {problem}")
    except FastaError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        where = f"after {_name(number, last)}" if number else "before the first record"
        raise FastaError(f"{path}: truncated or corrupt gzip {where} ({error})") from error
    if number == 0:
        raise FastaError(f"{path}: no FASTA records (empty file?)")
    _check_unique_ids(path, id_hashes)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise FastaError(
            f"{path}: {len(problems)} invalid record(s) (pass --skip-invalid to skip them):\n"
            f"  {listed}{more}"
        )
    if not valid:
        raise FastaError(f"{path}: every record is invalid ({skipped} skipped)")


def _check_unique_ids(path: Path, id_hashes: array.array) -> None:
    """Raise for the first repeated id. Ids are kept as 8-byte hashes; only when two hashes
    are equal is the file read again, for the ids behind them."""
    import numpy as np

    hashes = np.frombuffer(id_hashes, dtype=np.int64)
    hashes.sort()  # in place: no second copy of 8 bytes per record
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return
    seen: dict[str, int] = {}
    with _open_binary(path) as handle:
        for number, (_, data) in enumerate(_split_records(handle, 0), start=1):
            record_id = _parse(path, data)[0]
            if hash(record_id) not in repeated:
                continue
            if record_id in seen:
                raise FastaError(
                    f"{path}: duplicate id {record_id!r} in records {seen[record_id]} and "
                    f"{number}; ids must be unique"
                )
            seen[record_id] = number


def read_fasta(
    path: str | Path, *, skip_invalid: bool = False
) -> tuple[list[FastaRecord], list[SkippedRecord]]:
    """Read and validate a FASTA file (plain or gzipped) whole: :func:`scan_fasta` as lists.

    Returns (records in file order, records skipped with ``skip_invalid``); the file is read
    completely before anything is returned, so a caller can validate before writing any output.
    """
    records: list[FastaRecord] = []
    skipped: list[SkippedRecord] = []
    for item in scan_fasta(path, skip_invalid=skip_invalid):
        if item.record is not None:
            records.append(item.record)
        else:
            skipped.append(item.skipped)
    return records, skipped


def write_fasta(records: Iterable[FastaRecord], handle: TextIO, *, width: int = 60) -> int:
    """Write records (header ``>description``, ``width`` residues a line); returns the count."""
    from Bio.Seq import Seq
    from Bio.SeqIO.FastaIO import FastaWriter  # SeqIO.write(..., "fasta") with a line width
    from Bio.SeqRecord import SeqRecord

    writer = FastaWriter(handle, wrap=width)
    return writer.write_file(
        SeqRecord(Seq(r.sequence), id=r.id, description=r.description) for r in records
    )
