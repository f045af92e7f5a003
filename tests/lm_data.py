"""Tiny prepared datasets for the training tests, in prepare-data's layout.

``<dir>/{train,valid,test,ood}.h5`` written by :func:`protperf.data.build.write_split` (the
pipeline's writer), plus ``tokenizer.json`` and ``manifest.json``. Sequences come from a real
UniProt proteome.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from protperf import tokenizer as tok
from protperf.data.build import write_split


def ecoli_fasta(proteome_dir: Path, path: Path, count: int) -> list[str]:
    """Write the first ``count`` E. coli proteins of the shared proteomes, headers and all, as a
    plain FASTA file at ``path``; returns their ids."""
    source = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    with gzip.open(source, "rt") as handle:
        records = handle.read().split(">")[1 : count + 1]
    path.write_text("".join(">" + record for record in records))
    return [record.split()[0] for record in records]


def read_fasta(path: Path, limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` (accession, sequence) records of a (gzipped) FASTA file."""
    records: list[tuple[str, str]] = []
    accession, chunks = None, []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if accession is not None:
                    records.append((accession, "".join(chunks)))
                    if len(records) == limit:
                        return records
                fields = line[1:].split("|")
                accession, chunks = (fields[1] if len(fields) > 1 else line[1:].split()[0]), []
            else:
                chunks.append(line.strip())
    if accession is not None and len(records) < limit:
        records.append((accession, "".join(chunks)))
    return records


def write_dataset(
    out: Path,
    fasta: Path,
    *,
    sizes: dict[str, int] | None = None,
    concat_length: int = 256,
    max_residues: int | None = None,
) -> Path:
    """Split the first records of ``fasta`` into train/valid/test/ood files under ``out``.

    ``max_residues`` truncates sequences (keeps tests fast); sizes default to 96/13/11/7.
    """
    sizes = sizes or {"train": 96, "valid": 13, "test": 11, "ood": 7}
    records = read_fasta(fasta, sum(sizes.values()))
    if max_residues is not None:
        records = [(a, s[:max_residues]) for a, s in records]
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, count in sizes.items():
        chunk = records[start : start + count]
        write_split(
            out / f"{split}.h5",
            [sequence for _, sequence in chunk],
            [accession for accession, _ in chunk],
            split=split,
            concat_length=concat_length,
        )
        start += count
    tok.save_tokenizer_json(out / "tokenizer.json")
    (out / "manifest.json").write_text(json.dumps({"sizes": sizes, "concat_length": concat_length}))
    return out


def h5_contents(path: Path) -> dict[str, object]:
    """Every dataset (``name``) and attribute (``@name``) of an HDF5 file, read whole."""
    import h5py

    with h5py.File(path, "r") as f:
        found: dict[str, object] = {name: f[name][()] for name in f}
        found.update({f"@{name}": value for name, value in f.attrs.items()})
    return found
