"""User FASTA files in and out (biopython), validated against the model's amino-acid alphabet.

:func:`read_fasta` reads plain or gzipped FASTA (detected from the content, not the name) and
returns records whose sequences are upper-case residue letters with a trailing ``*`` (stop codon)
removed. Anything a model cannot read raises :class:`FastaError` naming the file and the record:
a missing, empty, binary or non-FASTA file, a truncated gzip, a record without an id or without
a sequence, letters outside the vocabulary (``ACDEFGHIKLMNPQRSTVWY`` and ``BOUXZ``, any case),
and duplicate ids. With ``skip_invalid=True`` records without a sequence or with invalid letters
are skipped and returned with the reason instead.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from protperf.errors import InputError
from protperf.tokenizer import RESIDUES

ALPHABET = frozenset(RESIDUES)
MAX_LISTED = 10  # problems spelled out in one error message


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


def _open_text(path: Path) -> TextIO:
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


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


def read_fasta(
    path: str | Path, *, skip_invalid: bool = False
) -> tuple[list[FastaRecord], list[SkippedRecord]]:
    """Read and validate a FASTA file (plain or gzipped).

    Returns (records in file order, records skipped with ``skip_invalid``). Raises
    :class:`FastaError` as described in the module docstring; the file is read completely
    before anything is returned, so a caller can validate before writing any output.
    """
    path = Path(path)
    if not path.exists():
        raise FastaError(f"{path}: no such file")
    if not path.is_file():
        raise FastaError(f"{path}: not a file")
    from Bio import SeqIO

    records: list[FastaRecord] = []
    skipped: list[SkippedRecord] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    number, last = 0, ""
    try:
        with _open_text(path) as handle:
            for number, record in enumerate(SeqIO.parse(handle, "fasta"), start=1):
                last = record.id
                if not record.id:
                    raise FastaError(f"{path}: record {number} has no id (a bare '>' line)")
                if record.id in seen:
                    raise FastaError(
                        f"{path}: duplicate id {record.id!r} in records {seen[record.id]} and "
                        f"{number}; ids must be unique"
                    )
                seen[record.id] = number
                sequence = "".join(str(record.seq).split()).upper()
                if sequence.endswith("*"):
                    sequence = sequence[:-1]
                problem = _problem(sequence)
                if problem is None:
                    records.append(FastaRecord(record.id, record.description, sequence))
                elif skip_invalid:
                    skipped.append(SkippedRecord(number, record.id, problem))
                else:
                    problems.append(f"{_name(number, record.id)}: {problem}")
    except FastaError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        where = f"after {_name(number, last)}" if number else "before the first record"
        raise FastaError(f"{path}: truncated or corrupt gzip {where} ({error})") from error
    except UnicodeDecodeError as error:
        raise FastaError(
            f"{path}: not a FASTA text file (binary content: {error.reason})"
        ) from error
    except ValueError as error:  # biopython: text before the first '>'
        if number:
            raise FastaError(
                f"{path}: malformed FASTA after {_name(number, last)}: {error}"
            ) from error
        raise FastaError(
            f"{path}: not a FASTA file (the first line does not start with '>')"
        ) from error
    if number == 0:
        raise FastaError(f"{path}: no FASTA records (empty file?)")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise FastaError(
            f"{path}: {len(problems)} invalid record(s) (pass --skip-invalid to skip them):\n"
            f"  {listed}{more}"
        )
    if not records:
        raise FastaError(f"{path}: every record is invalid ({len(skipped)} skipped)")
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
