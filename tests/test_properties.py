"""Property tests (hypothesis): the FASTA and UniProt flat-file readers agree with Biopython's
parsers on generated files, and the tokenizer round-trips every protein.

Generated files vary what real files vary: line lengths, lower case, ``*``, CRLF line ends,
blank lines, trailing spaces and tabs, headers with odd characters (``>``, ``|``, tabs, any
Unicode), text before the first FASTA record, and gzip files of several members cut anywhere,
read in chunks cut anywhere. Example counts keep the whole file to a few seconds.
"""

from __future__ import annotations

import gzip
import io
import itertools
from dataclasses import dataclass

import numpy as np
from Bio import SwissProt
from Bio.SeqIO.FastaIO import SimpleFastaParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protperf import tokenizer
from protperf.data.records import (
    fasta_accession,
    fasta_records,
    iter_batches,
    iter_fasta_batches,
    iter_flat_batches,
)
from protperf.data.stream import gunzip_chunks
from protperf.fasta import read_fasta

EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RESIDUES = tokenizer.RESIDUES
#: Letters a sequence line may hold: residues in either case, a stop, and letters outside the
#: vocabulary (read as X by protperf).
SEQUENCE_LETTERS = RESIDUES + RESIDUES.lower() + "*JjZz"
#: Header text: any character but line breaks and other control characters (tabs allowed).
HEADER_TEXT = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")) | st.sampled_from("\t>|;"),
    max_size=40,
)


def normalised(sequence: str) -> str:
    """A sequence as protperf stores it: upper case, letters outside the vocabulary as X."""
    return tokenizer.decode(tokenizer.encode(sequence))


@st.composite
def cuts(draw, data: bytes, most: int = 6) -> list[bytes]:
    """``data`` cut at up to ``most`` places (pieces may be empty)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=most)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def gzip_members(draw, data: bytes) -> bytes:
    """``data`` as a gzip file of several members, split at arbitrary byte positions."""
    return b"".join(gzip.compress(piece, mtime=0) for piece in draw(cuts(data, most=3)))


def line_end(draw) -> str:
    return draw(st.sampled_from(["\n", "\r\n"]))


# ---------------------------------------------------------------------------------------------
# FASTA
# ---------------------------------------------------------------------------------------------


@dataclass
class FastaFile:
    data: bytes
    titles: list[str]  # what the file holds, before any parser


@st.composite
def fasta_files(draw, *, preamble: bool = True, stops_inside: bool = True) -> FastaFile:
    """FASTA bytes of 1 to 6 records, and their titles. Without ``stops_inside`` the sequences
    hold residue letters only, and a '*' only at the end (what a model may read)."""
    count = draw(st.integers(1, 6))
    out, titles = [], []
    if preamble and draw(st.booleans()):  # comments or blank lines before the first record
        for _ in range(draw(st.integers(1, 3))):
            text = draw(st.text(st.sampled_from("; abcXYZ\t"), max_size=10))
            out.append(text + line_end(draw))
    for _ in range(count):
        title = draw(HEADER_TEXT)
        titles.append(title)
        out.append(">" + title + line_end(draw))
        letters = SEQUENCE_LETTERS if stops_inside else RESIDUES + RESIDUES.lower()
        sequence = draw(st.text(st.sampled_from(letters), min_size=1, max_size=150))
        if not stops_inside and draw(st.booleans()):
            sequence += "*"
        width = draw(st.integers(1, 80))
        for start in range(0, len(sequence), width):
            trailing = draw(st.sampled_from(["", "", " ", "\t", "  \t"]))
            out.append(sequence[start : start + width] + trailing + line_end(draw))
            if draw(st.integers(0, 9)) == 0:
                out.append(line_end(draw))  # a blank line
    text = "".join(out)
    if draw(st.booleans()):
        text = text.rstrip("\r\n")  # no final line end
    return FastaFile(text.encode("utf-8"), titles)


def biopython_fasta(data: bytes) -> list[tuple[str, str]]:
    handle = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline=None)
    return list(SimpleFastaParser(handle))


@EXAMPLES
@given(st.data())
def test_fasta_scanner_agrees_with_biopython(data):
    fasta = data.draw(fasta_files())
    expected = biopython_fasta(fasta.data)
    assert len(expected) == len(fasta.titles)
    chunks = data.draw(cuts(fasta.data, most=8))
    # Record by record: the title (as Biopython strips it) and the residues.
    records = [record for block in fasta_records(chunks) for record in block]
    titles = [record.partition(b"\n")[0].decode("utf-8").rstrip() for record in records]
    assert titles == [title for title, _ in expected]
    # Tokenized batches: accessions and sequences.
    batches = list(iter_fasta_batches(iter(chunks)))
    accessions = [a.decode("latin-1") for batch in batches for a in batch.accessions]
    sequences = [s for batch in batches for s in batch.sequences()]
    # (UniProt's db|accession|name, else the first word, of each title as written)
    assert accessions == [
        fasta_accession(title.encode("utf-8").decode("latin-1")) for title in fasta.titles
    ]
    assert sequences == [normalised(sequence) for _, sequence in expected]


@EXAMPLES
@given(st.data())
def test_gzipped_fasta_of_several_members_reads_as_the_plain_file(data):
    fasta = data.draw(fasta_files(preamble=False))
    compressed = data.draw(gzip_members(fasta.data))
    chunks = data.draw(cuts(compressed, most=8))
    batches = iter_batches(gunzip_chunks(iter(chunks), source="x.gz"), source="x.gz")
    sequences = [s for batch in batches for s in batch.sequences()]
    assert sequences == [normalised(sequence) for _, sequence in biopython_fasta(fasta.data)]


@EXAMPLES
@given(data=st.data())
def test_user_fasta_reader_agrees_with_biopython(data, tmp_path_factory):
    """protperf.fasta.read_fasta (embed's reader): ids, headers and residues as Biopython reads
    them, upper case, a final '*' removed; plain or gzip of several members."""
    fasta = data.draw(fasta_files(preamble=False, stops_inside=False))
    expected = biopython_fasta(fasta.data)
    ids = [title.split(None, 1)[0] if title.split() else "" for title, _ in expected]
    if "" in ids or len(set(ids)) < len(ids):
        return  # records without an id, or duplicates: errors by design (test_embed.py)
    path = tmp_path_factory.mktemp("fasta") / "in.fasta"
    path.write_bytes(
        data.draw(gzip_members(fasta.data)) if data.draw(st.booleans()) else fasta.data
    )
    records, skipped = read_fasta(path)
    assert skipped == []
    assert [r.id for r in records] == ids
    assert [r.description for r in records] == [title for title, _ in expected]
    assert [r.sequence for r in records] == [s.upper().removesuffix("*") for _, s in expected]


# ---------------------------------------------------------------------------------------------
# UniProt flat files
# ---------------------------------------------------------------------------------------------

ACCESSION = st.from_regex(r"[OPQ][0-9][A-Z0-9]{3}[0-9]", fullmatch=True)
PFAM = st.integers(1, 99_999).map(lambda number: f"PF{number:05d}")
FLAT_LETTERS = RESIDUES + RESIDUES.lower() + "*"


@st.composite
def flat_record(draw) -> str:
    accessions = draw(st.lists(ACCESSION, min_size=1, max_size=4, unique=True))
    families = draw(st.lists(PFAM, max_size=3, unique=True))
    sequence = draw(st.text(st.sampled_from(FLAT_LETTERS), min_size=1, max_size=200))
    description = draw(HEADER_TEXT.filter(lambda text: text == text.strip()))
    lines = [f"ID   {draw(st.from_regex(r'[A-Z0-9]{1,8}_[A-Z]{3,5}', fullmatch=True))}"
             f"   Unreviewed;   {len(sequence)} AA."]  # fmt: skip
    split = draw(st.integers(1, len(accessions)))  # accessions over one or two AC lines
    for group in (accessions[:split], accessions[split:]):
        if group:
            lines.append("AC   " + " ".join(f"{accession};" for accession in group))
    lines.append(f"DE   SubName: Full={description};")
    lines += [f"DR   Pfam; {family}; Some_name; 1." for family in families]
    lines.append(f"SQ   SEQUENCE   {len(sequence)} AA;  1000 MW;  0123456789ABCDEF CRC64;")
    width, group = draw(st.integers(1, 80)), draw(st.integers(1, 20))
    for start in range(0, len(sequence), width):
        piece = sequence[start : start + width]
        grouped = " ".join(piece[i : i + group] for i in range(0, len(piece), group))
        lines.append("     " + grouped + draw(st.sampled_from(["", " ", "  "])))
    lines.append("//")
    return "".join(line + line_end(draw) for line in lines)


def biopython_flat(data: bytes) -> list[tuple[str, str, tuple[str, ...]]]:
    handle = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline=None)
    return [
        (
            record.accessions[0],
            record.sequence,
            tuple(ref[1] for ref in record.cross_references if ref[0] == "Pfam"),
        )
        for record in SwissProt.parse(handle)
    ]


def scanned_flat(batches) -> list[tuple[str, str, tuple[str, ...]]]:
    out = []
    for batch in batches:
        out += zip(
            [a.decode() for a in batch.accessions], batch.sequences(), batch.pfam, strict=True
        )
    return out


@EXAMPLES
@given(st.lists(flat_record(), min_size=1, max_size=5), st.data())
def test_flat_file_scanner_agrees_with_biopython(records, data):
    flat = "".join(records).encode("utf-8")
    expected = [
        (accession, normalised(sequence), pfam)
        for accession, sequence, pfam in biopython_flat(flat)
    ]
    assert len(expected) == len(records)
    leading = data.draw(st.sampled_from(["", "\n", "\r\n\r\n"])).encode()  # protperf skips it
    chunks = data.draw(cuts(leading + flat, most=8))
    assert scanned_flat(iter_flat_batches(iter(chunks), collect_pfam=True)) == expected
    # Gzip of several members, detected as a flat file, held-out flags from the Pfam lines.
    compressed = data.draw(gzip_members(flat))
    held_out = data.draw(st.sampled_from([pfam for _, _, pfam in expected if pfam] or [()]))
    batches = list(
        iter_batches(
            gunzip_chunks(iter(data.draw(cuts(compressed))), source="x.dat.gz"),
            source="x.dat.gz",
            held_out_families=held_out,
        )
    )
    flags = np.concatenate([batch.held_out for batch in batches]).tolist()
    assert flags == [bool(set(held_out) & set(pfam)) for _, _, pfam in expected]


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

PROTEINS = st.text(st.sampled_from(RESIDUES), max_size=300)


@settings(max_examples=200, deadline=None)
@given(PROTEINS)
def test_decode_inverts_encode(protein):
    assert tokenizer.decode(tokenizer.encode(protein)) == protein
    assert tokenizer.decode(tokenizer.encode(protein.lower())) == protein
    assert tokenizer.decode(tokenizer.encode(protein.encode("ascii"))) == protein
    assert tokenizer.count_unknown(protein) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(PROTEINS.filter(bool), min_size=1, max_size=5))
def test_batch_encode_round_trips_every_row(proteins):
    tokens, padding = tokenizer.batch_encode(proteins)
    for row, protein in zip(tokens.numpy(), proteins, strict=True):
        assert row[0] == tokenizer.BOS and row[len(protein) + 1] == tokenizer.EOS
        assert tokenizer.decode(row) == protein
    assert (padding is None) == (len({len(p) for p in proteins}) == 1)


HF_TOKENIZER = tokenizer.build_hf_tokenizer()


@settings(max_examples=100, deadline=None)
@given(st.text(st.sampled_from(RESIDUES + RESIDUES.lower() + "*J1 -"), min_size=1, max_size=80))
def test_tokenizer_json_gives_the_ids_of_encode(text):
    ids = HF_TOKENIZER.encode(text).ids
    assert ids == [tokenizer.BOS, *tokenizer.encode(text).tolist(), tokenizer.EOS]
    assert tokenizer.count_unknown(text) == sum(
        char not in RESIDUES + RESIDUES.lower() for char in text
    )
