"""Flat-file and FASTA records: the block scanner agrees with Biopython on the real shared files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from Bio import SwissProt

from protperf import tokenizer
from protperf.data.errors import FormatError
from protperf.data.records import (
    detect_format,
    fasta_accession,
    iter_batches,
    iter_fasta_batches,
    iter_flat_batches,
    load_held_out_accessions,
    record_spans,
)
from protperf.data.stream import file_chunks

DAT_FILES = ["biopython_multi_ex.dat", "emboss_swissprot_100.dat", "emboss_trembl.dat"]


def biopython_records(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    with open(path) as handle:
        return [
            (
                record.accessions[0],
                record.sequence,
                tuple(ref[1] for ref in record.cross_references if ref[0] == "Pfam"),
            )
            for record in SwissProt.parse(handle)
        ]


def scanned(chunks, **kwargs) -> list[tuple[str, str, tuple[str, ...]]]:
    out = []
    for batch in iter_flat_batches(chunks, collect_pfam=True, **kwargs):
        assert batch.tokens.dtype == np.uint8 and batch.lengths.sum() == batch.tokens.size
        out += zip(
            [a.decode() for a in batch.accessions], batch.sequences(), batch.pfam, strict=True
        )
    return out


@pytest.mark.parametrize("name", DAT_FILES)
def test_flat_scanner_matches_biopython(uniprot_dat_dir, name):
    path = uniprot_dat_dir / name
    expected = biopython_records(path)
    assert len(expected) >= 8
    assert scanned(file_chunks(path)) == expected


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 777, 4096])
def test_chunk_boundaries_do_not_matter(uniprot_dat_dir, chunk_size):
    path = uniprot_dat_dir / "emboss_trembl.dat"
    whole = scanned(file_chunks(path))
    data = path.read_bytes()
    assert scanned(data[i : i + chunk_size] for i in range(0, len(data), chunk_size)) == whole
    spans = list(record_spans(data[i : i + 4096] for i in range(0, len(data), 4096)))
    assert len(spans) > 5
    assert b"".join(block[start:end] for block, start, end in spans) == data
    assert all(block[start:end].endswith(b"\n//\n") for block, start, end in spans)


def test_held_out_flags_follow_pfam_lines(uniprot_dat_dir):
    path = uniprot_dat_dir / "emboss_swissprot_100.dat"
    expected = [("PF00001" in pfam) for _, _, pfam in biopython_records(path)]
    flags = np.concatenate(
        [b.held_out for b in iter_flat_batches(file_chunks(path), ["PF00001", "PF99999"])]
    )
    assert flags.tolist() == expected
    assert 5 <= sum(expected) < len(expected)


def test_fasta_matches_flat_file(uniprot_dat_dir):
    flat = scanned(file_chunks(uniprot_dat_dir / "biopython_multi_ex.dat"))
    fasta = []
    for batch in iter_fasta_batches(file_chunks(uniprot_dat_dir / "biopython_multi_ex.fasta")):
        fasta += zip([a.decode() for a in batch.accessions], batch.sequences(), strict=True)
    assert fasta == [(accession, sequence) for accession, sequence, _ in flat]


def test_fasta_proteome_gz(proteome_dir):
    path = proteome_dir / "UP000002717-S.elongatus.fasta.gz"
    with gzip.open(path, "rt") as handle:
        text = handle.read()
    records = [r for r in text.split(">") if r]
    expected_accessions = [r.split("|")[1] for r in records]
    expected_sequences = ["".join(r.splitlines()[1:]) for r in records]
    from protperf.data.stream import gunzip_chunks

    batches = list(iter_batches(gunzip_chunks(file_chunks(path), source=str(path)), source="x"))
    accessions = [a.decode() for b in batches for a in b.accessions]
    sequences = [s for b in batches for s in b.sequences()]
    assert accessions == expected_accessions
    assert sequences == [s.upper().replace("*", "X") for s in expected_sequences]
    assert len(accessions) == 2658  # the shared README's count


def _pieces(data: bytes, size: int):
    return (data[i : i + size] for i in range(0, len(data), size))


def test_fasta_reader_equals_biopython_on_every_shared_proteome(proteome_dir):
    """79 k real records, fed in odd-sized chunks so that records and "\\n>" straddle them."""
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    for number, path in enumerate(sorted(proteome_dir.glob("*.fasta.gz"))):
        data = gzip.decompress(path.read_bytes())
        with gzip.open(path, "rt") as handle:
            expected = [
                (fasta_accession(title), sequence.upper().replace("*", "X"))
                for title, sequence in SimpleFastaParser(handle)
            ]
        got = []
        for batch in iter_fasta_batches(_pieces(data, 4093 + 997 * number)):
            got += zip([a.decode() for a in batch.accessions], batch.sequences(), strict=True)
        assert got == expected, path.name


@pytest.mark.parametrize("size", [1, 2, 3, 5, 1 << 20])
def test_fasta_layouts_any_chunking(size):
    """Text before the first header, CRLF, blank lines, wrapped lines, no final newline."""
    text = b"junk line\r\n\r\n>sp|P1|A one\r\nMK\r\nTA\r\n\r\n>two words\nAC DE\n\n>sp|P3|C\nW"
    batches = list(iter_fasta_batches(_pieces(text, size)))
    assert [a for b in batches for a in b.accessions] == [b"P1", b"two", b"P3"]
    assert [s for b in batches for s in b.sequences()] == ["MKTA", "ACDE", "W"]
    (first,) = iter_fasta_batches(_pieces(text, size), max_records=2)
    assert first.sequences() == ["MKTA", "ACDE"]


def test_fasta_accessions_and_unknown_residues():
    assert fasta_accession("sp|P12345|NAME_HUMAN Protein OS=Homo") == "P12345"
    assert fasta_accession("tr|A0A023GPI8-2|X_Y desc") == "A0A023GPI8-2"
    assert fasta_accession("my_protein some words") == "my_protein"
    text = b">a\nMKJ*\nbo\n>b desc\nACDE\n"
    (batch,) = iter_fasta_batches(iter([text]), {"b"})
    assert batch.sequences() == ["MKXXBO", "ACDE"]
    assert batch.unknown == 2
    assert batch.held_out.tolist() == [False, True]
    np.testing.assert_array_equal(batch.tokens[:2], tokenizer.encode("MK"))


def test_isoform_is_held_out_with_its_canonical_accession():
    (batch,) = iter_fasta_batches(iter([b">sp|P1-2|N\nMK\n>sp|P2|N\nMK\n"]), {"P1"})
    assert batch.held_out.tolist() == [True, False]


RECORD = (
    b"ID   TEST_HUMAN              Reviewed;          12 AA.\n"
    b"AC   P99999; Q88888;\n"
    b"DR   Pfam; PF00001; 7tm_1; 1.\n"
    b"SQ   SEQUENCE   12 AA;  1000 MW;  0000000000000000 CRC64;\n"
    b"     MKTAYIAKQR QI\n"
    b"//\n"
)


def flat_error(data: bytes) -> str:
    with pytest.raises(FormatError) as caught:
        list(iter_flat_batches(iter([data]), source="broken.dat"))
    return str(caught.value)


def test_malformed_flat_records_name_file_and_record():
    assert scanned(iter([RECORD + RECORD]))[1] == ("P99999", "MKTAYIAKQRQI", ("PF00001",))
    no_sequence = RECORD.replace(b"     MKTAYIAKQR QI\n", b"")
    message = flat_error(RECORD + no_sequence)
    assert "broken.dat" in message and "record 2" in message and "P99999" in message
    assert "empty sequence" in message
    no_sq = RECORD.replace(RECORD.splitlines(True)[3], b"").replace(b"     MKTAYIAKQR QI\n", b"")
    assert "record 1 (P99999) has no SQ line" in flat_error(no_sq)
    longer = RECORD.replace(b"12 AA", b"14 AA").replace(b"QI\n", b"QIKK\n")
    message = flat_error(no_sq + longer)  # the SQ line found is the next record's
    assert "record 1 (P99999): 14 residues but its ID line says 12" in message
    message = flat_error(RECORD + RECORD[:-3])
    assert "record 2 (P99999) is cut off" in message
    assert "no AC line" in flat_error(b"ID   X\nSQ   SEQUENCE\n     MK\n//\n")


def test_record_without_end_line_fails_without_reading_on():
    """A flat file whose '//' lines are missing fails once a record outgrows the limit, long
    before the (here endless) stream ends, instead of holding the rest of the file in memory."""
    pulled = []

    def chunks():
        yield RECORD + RECORD
        damaged = RECORD.replace(b"//\n", b"")
        for _ in range(10_000):
            pulled.append(1)
            yield damaged

    batches = iter_flat_batches(chunks(), source="broken.dat", max_record_bytes=5 * len(RECORD))
    with pytest.raises(FormatError) as error:
        list(batches)
    message = str(error.value)
    assert "broken.dat: record 3 has no '//' line within its first" in message
    assert 4 <= len(pulled) <= 7  # stopped right after the limit


def test_not_fasta_nor_flat_file():
    with pytest.raises(FormatError, match=r"notes\.txt: neither a UniProt flat file"):
        detect_format(b"hello world\n", source="notes.txt")
    with pytest.raises(FormatError, match="empty"):
        detect_format(b"\n\n", source="empty.fa")
    assert detect_format(b"\n>x\nMK\n", source="a") == "fasta"


def test_fasta_record_without_sequence():
    with pytest.raises(FormatError, match=r"seqs\.fa: record 2 \(P2\) has no sequence"):
        list(
            iter_fasta_batches(iter([b">sp|P1|A\nMK\n>sp|P2|B\n>sp|P3|C\nMK\n"]), source="seqs.fa")
        )


def test_pfam_mapping_formats():
    lines = [
        "Entry\tPfam\n",
        "P11111\tPF00001;PF00002;\n",
        "P22222\tPF00003;\n",
        "A0A000\t1\tabc\tmd5\tPF00002\t10\t200\n",  # Pfam-A.regions.uniprot.tsv
        "P33333\t\n",
    ]
    assert load_held_out_accessions(lines, ["PF00002"]) == {"P11111", "A0A000"}


def test_windows_line_ends_are_read_whatever_the_first_chunk(uniprot_dat_dir):
    """CRLF files (and files that mix line ends) read as the Unix file, even when the first
    chunk is too short to hold a line end (a network read, a tar member's first piece)."""
    data = (uniprot_dat_dir / "emboss_swissprot_100.dat").read_bytes()
    expected = scanned([data])
    crlf = data.replace(b"\n", b"\r\n")
    assert scanned([crlf[:10], crlf[10:]]) == expected
    mixed = data.replace(b"//\n", b"//\r\n")
    assert scanned(mixed[i : i + 4096] for i in range(0, len(mixed), 4096)) == expected
