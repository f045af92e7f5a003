"""Records from UniProt flat files and FASTA: accession, tokenized sequence, held-out flag.

Records come in :class:`RecordBatch` es of a few MB, never one Python object per record: the
flat-file scanner works on multi-MB blocks that end on a record boundary, finds each record's
``//`` terminator, ``AC`` and ``SQ`` lines and ``DR   Pfam;`` lines with ``bytes.find`` (C speed),
strips and tokenizes each sequence with one ``bytes.translate`` (a table built from
:func:`protperf.tokenizer.encode`, so the ids are protperf's). FASTA is read the same way:
blocks that end on a record boundary, split at each ``\n>``, each record's sequence stripped and
tokenized by one ``bytes.translate``; records and titles as Biopython's ``SimpleFastaParser``
gives them (tested on the shared proteomes), at about twice the speed of a reader built on
``SimpleFastaParser``, which splits lines in Python. UniProt headers give the accession, any
other FASTA its first word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from protperf import tokenizer
from protperf.data.errors import FormatError
from protperf.data.stream import peek

#: Bytes removed from sequence lines (flat files indent and group residues by 10).
_SEQUENCE_WHITESPACE = b" \n\r\t"
_UNKNOWN = 0xFF
#: ``bytes.translate`` table: residue letter -> token id (protperf.tokenizer's), anything else
#: -> 0xFF, counted and then mapped to X. One C pass per sequence strips and tokenizes it.
_TOKEN_TABLE = bytes(
    _UNKNOWN if tokenizer.count_unknown(bytes([byte])) else int(token)
    for byte, token in enumerate(tokenizer.encode(bytes(range(256))))
)
_X_TOKEN = bytes([tokenizer.X_ID])
#: Ends in a rare letter, so that bytes.find skips fast (2.3 GB/s here; 1.7 for "...Pfam; ").
_PFAM_LINE = b"\nDR   Pfam; PF"
#: Flat-file bytes per batch: several decompressed chunks (about 1 MB each) make one batch.
_BATCH_BYTES = 8 << 20
_FASTA_BATCH_RESIDUES = 16 << 20
#: The most bytes one flat-file record may take before its ``//`` line. UniProt's largest
#: records (titin and its kin, thousands of FT lines) take a few MB; a file whose ``//`` lines
#: are missing would otherwise be held in memory whole before the scanner could report it.
MAX_FLAT_RECORD_BYTES = 64 << 20
_UNIPROT_FASTA_ID = re.compile(rb"^[A-Za-z0-9_]+\|([^|\s]+)\|")
_PFAM_ID = re.compile(r"\bPF\d{5}\b")


@dataclass
class RecordBatch:
    """Consecutive records: ``accessions[i]`` has residues ``tokens[o_i:o_i + lengths[i]]``.

    ``tokens``: uint8 token ids of all sequences back to back (no special tokens), shape
    (lengths.sum(),). ``lengths``: int64, shape (n,). ``held_out``: bool, shape (n,), True where
    the record has a held-out Pfam family. ``unknown``: residues mapped to X because they are
    not in the vocabulary. ``pfam``: the Pfam ids of each record, only when asked for.
    """

    accessions: list[bytes]
    tokens: np.ndarray
    lengths: np.ndarray
    held_out: np.ndarray
    unknown: int = 0
    pfam: list[tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.accessions)

    def sequences(self) -> list[str]:
        """The residue strings (unknown letters read back as X)."""
        ends = np.cumsum(self.lengths).tolist()
        starts = [0, *ends[:-1]]
        return [tokenizer.decode(self.tokens[a:b]) for a, b in zip(starts, ends, strict=True)]


def detect_format(head: bytes, *, source: str) -> str:
    """``"flat"`` (UniProt .dat, first line ``ID   ``) or ``"fasta"`` (``>``) from the first bytes."""
    text = head.lstrip()
    if text.startswith(b"ID   "):
        return "flat"
    if text.startswith(b">"):
        return "fasta"
    if not text:
        raise FormatError(f"{source}: the file is empty")
    raise FormatError(
        f"{source}: neither a UniProt flat file (first line 'ID   ...') nor FASTA ('>' header); "
        f"it starts with {text[:40]!r}"
    )


class UnterminatedRecord(Exception):
    """Raised by :func:`record_spans`: more than ``max_record_bytes`` without a ``//`` line."""


def record_spans(
    chunks: Iterable[bytes], *, max_record_bytes: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """``(buffer, start, end)`` spans of whole flat-file records, without copying the chunks.

    ``buffer[start:end]`` holds complete records (``ID`` ... ``//``). Most of each incoming
    chunk is scanned in place; only the record cut by a chunk boundary is copied (the end of
    one chunk joined to the start of the next). The last span is whatever remains, checked by
    the scanner. Leading blank lines are dropped; Windows line ends are converted, in whichever
    chunk they appear (a file may mix them). A record still open after ``max_record_bytes``
    (default :data:`MAX_FLAT_RECORD_BYTES`) raises :class:`UnterminatedRecord`, so memory
    stays bounded on a damaged file.
    """
    limit = MAX_FLAT_RECORD_BYTES if max_record_bytes is None else max_record_bytes
    separator = b"\n//\n"
    pending: list[bytes] = []  # a record cut by chunk boundaries, in pieces (joined once)
    held = 0  # bytes in pending
    first = True
    for chunk in chunks:
        chunk = bytes(chunk)
        if first:
            chunk = chunk.lstrip()
            first = not chunk
        if b"\r" in chunk:  # a memchr: Unix files pay almost nothing for the check
            chunk = chunk.replace(b"\r", b"")
        if not chunk:
            continue
        start = 0
        if pending:
            tail = b"".join(pending[-3:])[-3:]  # pieces are never empty
            bridge = tail + chunk[:3]  # a separator may straddle the boundary
            found = bridge.find(separator)
            if found >= 0:
                start = found + 4 - len(tail)
            else:
                found = chunk.find(separator)
                if found < 0:
                    pending.append(chunk)
                    held += len(chunk)
                    if held > limit:
                        raise UnterminatedRecord(limit)
                    continue
                start = found + 4
            piece = b"".join([*pending, chunk[:start]])
            pending = []
            yield piece, 0, len(piece)
        last = chunk.rfind(separator, start)
        if last < 0:
            pending = [chunk[start:]] if start < len(chunk) else []
        else:
            yield chunk, start, last + 4
            pending = [chunk[last + 4 :]] if last + 4 < len(chunk) else []
        held = len(pending[0]) if pending else 0
        if held > limit:
            raise UnterminatedRecord(limit)
    carry = b"".join(pending)
    if carry.endswith(b"\n//"):
        carry += b"\n"
    if carry.strip():
        yield carry, 0, len(carry)


class _Pending:
    """Records scanned but not yet handed out as a batch (several spans make one batch)."""

    def __init__(self, collect_pfam: bool) -> None:
        self.accessions: list[bytes] = []
        self.sequences: list[bytes] = []
        self.flagged: list[int] = []
        self.pfam: list[tuple[str, ...]] | None = [] if collect_pfam else None

    def batch(self) -> RecordBatch:
        return _make_batch(self.accessions, self.sequences, self.flagged, self.pfam)


def scan_flat_block(
    block: bytes,
    held_out: frozenset[bytes] = frozenset(),
    *,
    start: int = 0,
    end: int | None = None,
    source: str = "<flat file>",
    first_record: int = 0,
    collect_pfam: bool = False,
    max_records: int | None = None,
) -> RecordBatch:
    """Parse a block of whole UniProt flat-file records (``ID`` ... ``//``).

    Only ``block[start:end]`` is read. ``held_out`` holds Pfam ids as bytes (``b"PF00001"``);
    a record with one of them in a ``DR   Pfam;`` line is flagged. ``first_record`` (0-based)
    numbers records in error messages; at most ``max_records`` records are read. Raises
    :class:`FormatError` for a record without ID/AC/SQ line, without sequence, or cut off.
    """
    pending = _Pending(collect_pfam)
    _scan_flat(block, start, end, held_out, pending, source, first_record, max_records)
    return pending.batch()


def _scan_flat(
    block: bytes,
    start: int,
    end: int | None,
    held_out: frozenset[bytes],
    pending: _Pending,
    source: str,
    first_record: int,
    max_records: int | None,
) -> int:
    """Append the records of ``block[start:end]`` to ``pending``; returns how many."""
    find, rfind = block.find, block.rfind
    accessions, sequences, flagged, pfam = (
        pending.accessions, pending.sequences, pending.flagged, pending.pfam
    )  # fmt: skip
    scan_pfam = bool(held_out) or pfam is not None
    offset = len(accessions) - first_record  # record index -> position in the pending lists
    size = len(block) if end is None else end
    index = first_record
    stop_at = first_record + max_records if max_records is not None else -1
    while start < size and index != stop_at:
        # ID is the first line and AC the second; the length closes the ID line ("... 433 AA.").
        if not block.startswith(b"ID   ", start):
            raise FormatError(
                f"{source}: record {index + 1} does not start with an ID line: "
                f"{block[start : start + 40]!r}"
            )
        id_end = find(b"\n", start, size)
        line = id_end if block.startswith(b"\nAC   ", id_end) else find(b"\nAC   ", start, size)
        stop = find(b";", line + 6, size) if line >= 0 else -1
        if stop < 0:
            raise FormatError(f"{source}: record {index + 1} has no AC line")
        accession = block[line + 6 : stop]
        # The long needle makes this search (over the header) the fastest of the scan; the
        # end of the record is then searched over the sequence lines only.
        sq = find(b"\nSQ   SEQUENCE", id_end, size)
        end = find(b"\n//\n", sq + 1, size) if sq >= 0 else -1
        if end < 0:
            problem = "has no SQ line" if sq < 0 else "is cut off: no '//' line (truncated file?)"
            raise FormatError(
                f"{source}: record {index + 1} ({accession.decode(errors='replace')}) {problem}"
            )
        residues = block[find(b"\n", sq + 1) + 1 : end + 1].translate(
            _TOKEN_TABLE, _SEQUENCE_WHITESPACE
        )
        if not residues:
            raise FormatError(
                f"{source}: record {index + 1} ({accession.decode(errors='replace')}) "
                "has an empty sequence"
            )
        if block.startswith(b" AA.", id_end - 4):
            length = block[rfind(b" ", start, id_end - 4) + 1 : id_end - 4]
            if length.isdigit() and int(length) != len(residues):
                raise FormatError(
                    f"{source}: record {index + 1} ({accession.decode(errors='replace')}): "
                    f"{len(residues)} residues but its ID line says {int(length)} "
                    "(a missing SQ line or a damaged record)"
                )
        accessions.append(accession)
        sequences.append(residues)
        if scan_pfam:
            # Backwards from the SQ line: the Pfam lines sit near the end of the DR block, so
            # the search stops after the few lines below them (PE, KW, FT) instead of reading
            # the whole header again. Pfam lines are consecutive; the ones above the last are
            # read line by line.
            found: list[bytes] = []
            hit = rfind(_PFAM_LINE, id_end, sq)
            while hit >= 0:
                found.append(block[hit + 12 : hit + 19])
                hit = rfind(b"\n", id_end, hit)
                if not block.startswith(_PFAM_LINE, hit):
                    break
            found.reverse()  # file order
            if found and not held_out.isdisjoint(found):
                flagged.append(index + offset)
            if pfam is not None:
                pfam.append(tuple(family.decode() for family in found))
        start = end + 4
        index += 1
    return index - first_record


def _make_batch(
    accessions: list[bytes],
    sequences: list[bytes],
    flagged: list[int],
    pfam: list[tuple[str, ...]] | None,
) -> RecordBatch:
    """``sequences`` are token bytes from :data:`_TOKEN_TABLE` (unknown letters still 0xFF)."""
    joined = b"".join(sequences)
    unknown = joined.count(_UNKNOWN)
    if unknown:
        joined = joined.replace(bytes([_UNKNOWN]), _X_TOKEN)
    held_out = np.zeros(len(sequences), dtype=bool)
    held_out[flagged] = True
    return RecordBatch(
        accessions=accessions,
        tokens=np.frombuffer(joined, dtype=np.uint8),
        lengths=np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)),
        held_out=held_out,
        unknown=unknown,
        pfam=pfam,
    )


def fasta_accession(title: str) -> str:
    """The accession of a FASTA title: ``sp|P12345|NAME ...`` -> ``P12345``; else the first word."""
    return _accession(title.encode("latin-1")).decode("latin-1")


def _accession(title: bytes) -> bytes:
    match = _UNIPROT_FASTA_ID.match(title)
    if match:
        return match.group(1)
    words = title.split(None, 1)
    return words[0] if words else b""


def fasta_records(chunks: Iterable[bytes]) -> Iterator[list[bytes]]:
    """Lists of whole FASTA records (``title\nsequence lines``, the ``>`` removed), block by block.

    Text before the first ``>`` is skipped (as Biopython does); a record cut by a chunk
    boundary waits for the next chunk, so memory is one chunk plus the longest record. Each
    chunk is searched once, so a record spanning many chunks (a genome) costs linear time.
    """
    pending: list[bytes] = []  # the record(s) not yet complete: starts with ">"
    held = 0  # bytes in pending
    skipped = b""  # before the first ">": the last byte, a "\n" that a ">" may follow
    for chunk in chunks:
        chunk = bytes(chunk)
        if not pending:
            buffer = skipped + chunk
            if not buffer.startswith(b">"):
                first = buffer.find(b"\n>")
                if first < 0:
                    skipped = buffer[-1:]
                    continue
                buffer = buffer[first + 1 :]
            pending, held = [], 0
            chunk = buffer
            last = buffer.rfind(b"\n>")
        else:
            last = chunk.rfind(b"\n>")
            if last >= 0:
                last += held
            elif chunk.startswith(b">") and pending[-1].endswith(b"\n"):
                last = held - 1  # the "\n>" straddles the boundary
        pending.append(chunk)
        held += len(chunk)
        if last < 0:
            continue
        buffer = b"".join(pending)
        yield buffer[1:last].split(b"\n>")
        pending = [buffer[last + 1 :]]
        held = len(pending[0])
    if pending and pending[0]:
        yield b"".join(pending)[1:].split(b"\n>")


def iter_fasta_batches(
    chunks: Iterable[bytes],
    held_out_accessions: frozenset[str] | set[str] = frozenset(),
    *,
    source: str = "<fasta>",
    max_records: int | None = None,
) -> Iterator[RecordBatch]:
    """Batches of FASTA records (see :func:`fasta_records`), at most ``max_records`` in all.

    A record is held out when its accession (or, for an isoform ``P12345-2``, ``P12345``) is in
    ``held_out_accessions`` (from a Pfam mapping, see :func:`load_held_out_accessions`).
    Raises :class:`FormatError` for a record without sequence, naming the file and the record.
    """
    accessions: list[bytes] = []
    sequences: list[bytes] = []
    flagged: list[int] = []
    residues, index = 0, 0
    for records in fasta_records(chunks):
        for record in records:
            if index == max_records:
                break
            index += 1
            title, _, lines = record.partition(b"\n")
            accession = _accession(title)
            sequence = lines.translate(_TOKEN_TABLE, _SEQUENCE_WHITESPACE)
            if not sequence:
                name = accession.decode("latin-1") or repr(title.rstrip().decode("latin-1"))
                raise FormatError(f"{source}: record {index} ({name}) has no sequence")
            if held_out_accessions:
                text = accession.decode("latin-1")
                if text in held_out_accessions or text.split("-", 1)[0] in held_out_accessions:
                    flagged.append(len(accessions))
            accessions.append(accession)
            sequences.append(sequence)
            residues += len(sequence)
            if residues >= _FASTA_BATCH_RESIDUES:
                yield _make_batch(accessions, sequences, flagged, None)
                accessions, sequences, flagged, residues = [], [], [], 0
        if index == max_records:
            break
    if accessions:
        yield _make_batch(accessions, sequences, flagged, None)


def iter_flat_batches(
    chunks: Iterable[bytes],
    held_out_families: Iterable[str] = (),
    *,
    source: str = "<flat file>",
    collect_pfam: bool = False,
    max_records: int | None = None,
    max_record_bytes: int | None = None,
) -> Iterator[RecordBatch]:
    """Batches of UniProt flat-file records (see :func:`scan_flat_block`), at most
    ``max_records`` records in all; a record longer than ``max_record_bytes`` (default
    :data:`MAX_FLAT_RECORD_BYTES`) is an error."""
    held_out = frozenset(family.encode() for family in held_out_families)
    count, scanned = 0, 0
    pending = _Pending(collect_pfam)
    try:  # only record_spans raises UnterminatedRecord
        for block, start, end in record_spans(chunks, max_record_bytes=max_record_bytes):
            left = None if max_records is None else max_records - count
            count += _scan_flat(block, start, end, held_out, pending, source, count, left)
            scanned += end - start
            if count == max_records:
                break
            if scanned >= _BATCH_BYTES:
                yield pending.batch()
                pending, scanned = _Pending(collect_pfam), 0
    except UnterminatedRecord as error:
        raise FormatError(
            f"{source}: record {count + 1} has no '//' line within its first "
            f"{error.args[0]:,} bytes (a damaged file, or not a UniProt flat file)"
        ) from None
    if pending.accessions:
        yield pending.batch()


def iter_batches(
    chunks: Iterable[bytes],
    *,
    source: str,
    held_out_families: Iterable[str] = (),
    held_out_accessions: frozenset[str] | set[str] = frozenset(),
    collect_pfam: bool = False,
    max_records: int | None = None,
) -> Iterator[RecordBatch]:
    """Batches of records from decompressed bytes, flat file or FASTA (detected from the start).

    Flat files flag records by their own ``DR   Pfam;`` lines (``held_out_families``); FASTA by
    accession (``held_out_accessions``). At most ``max_records`` records are read.
    """
    head, chunks = peek(chunks, 4096)
    if detect_format(head, source=source) == "flat":
        yield from iter_flat_batches(
            chunks,
            held_out_families,
            source=source,
            collect_pfam=collect_pfam,
            max_records=max_records,
        )
    else:
        yield from iter_fasta_batches(
            chunks, held_out_accessions, source=source, max_records=max_records
        )


def load_held_out_accessions(lines: Iterable[str], families: Iterable[str]) -> set[str]:
    """Accessions that a Pfam mapping gives one of ``families``.

    One line per protein (or per protein and domain): the accession first, then anything, with
    Pfam ids (``PF00001``) anywhere on the line. This reads UniProt's TSV downloads (``Entry``
    and ``Pfam`` columns: ``P12345<TAB>PF00001;PF00002;``) and Pfam's
    ``Pfam-A.regions.uniprot.tsv``. Lines without a Pfam id (headers) are skipped. Only the
    held-out accessions are kept, so memory stays small whatever the file's size.
    """
    wanted = frozenset(families)
    accessions: set[str] = set()
    for line in lines:
        if "PF" not in line:
            continue
        fields = re.split(r"[\s,;]+", line.strip(), maxsplit=1)
        if len(fields) == 2 and not wanted.isdisjoint(_PFAM_ID.findall(fields[1])):
            accessions.add(fields[0])
    return accessions
