"""Tiny prepared datasets for the training tests, written with h5py in prepare-data's layout.

``<dir>/{train,valid,test,ood}.h5`` with ``tokens``, ``offsets``, ``accessions``, ``concat`` and
the attributes ``split``, ``num_sequences``, ``num_tokens``, ``concat_length``; plus
``tokenizer.json`` and ``manifest.json``. Sequences come from a real UniProt proteome.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np

from protperf import tokenizer as tok


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


def write_split(
    path: Path, records: list[tuple[str, str]], split: str, concat_length: int, seed: int = 0
) -> None:
    """One split file in prepare-data's layout."""
    encoded = [tok.encode(seq) for _, seq in records]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)
    order = np.random.default_rng(seed).permutation(len(encoded))
    stream = (
        np.concatenate([np.append(encoded[i], np.uint8(tok.EOS)) for i in order])
        if encoded
        else np.zeros(0, np.uint8)
    )
    chunks = len(stream) // concat_length
    concat = stream[: chunks * concat_length].reshape(chunks, concat_length).astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=tokens.astype(np.uint8))
        f.create_dataset("offsets", data=offsets)
        f.create_dataset(
            "accessions", data=[a.encode() for a, _ in records], dtype=h5py.string_dtype()
        )
        f.create_dataset("concat", data=concat, chunks=(1, concat_length) if chunks else None)
        f.attrs.update(
            split=split,
            num_sequences=len(records),
            num_tokens=int(lengths.sum()),
            concat_length=concat_length,
        )


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
        write_split(out / f"{split}.h5", records[start : start + count], split, concat_length)
        start += count
    tok.save_tokenizer_json(out / "tokenizer.json")
    (out / "manifest.json").write_text(json.dumps({"sizes": sizes, "concat_length": concat_length}))
    return out
