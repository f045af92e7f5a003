"""Dedupe, splits, concat chunks and the HDF5 layout, on synthetic batches and write_split."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from protperf import tokenizer
from protperf.data import build as build_module
from protperf.data.build import (
    OOD,
    SPLITS,
    DatasetBuilder,
    assign_splits,
    concat_order,
    hash_partitions,
    sequence_hashes,
    write_split,
)
from protperf.data.h5 import read_split
from protperf.data.records import RecordBatch

AMINO = np.frombuffer(tokenizer.STANDARD_AMINO_ACIDS.encode(), dtype=np.uint8)


def random_sequences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        AMINO[rng.integers(0, 20, rng.integers(2, 400))].tobytes().decode() for _ in range(count)
    ]


def batch(
    sequences: list[str], accessions: list[str], held: list[bool] | None = None
) -> RecordBatch:
    arrays = [tokenizer.encode(s) for s in sequences]
    return RecordBatch(
        accessions=[a.encode() for a in accessions],
        tokens=np.concatenate(arrays),
        lengths=np.array([len(a) for a in arrays], dtype=np.int64),
        held_out=np.array(held or [False] * len(sequences), dtype=bool),
    )


def joined_in_order(tokens: np.ndarray, offsets: np.ndarray, order: np.ndarray) -> np.ndarray:
    parts = []
    for index in order:
        parts += [tokens[offsets[index] : offsets[index + 1]], [tokenizer.EOS]]
    return np.concatenate(parts or [np.zeros(0)]).astype(np.uint8)


def test_write_split_round_trip_and_concat(tmp_path):
    sequences = random_sequences(50)
    path = write_split(tmp_path / "train.h5", sequences, concat_length=64, seed=3)
    data = read_split(path)
    assert [tokenizer.decode(data.sequence(i)) for i in range(len(data))] == sequences
    assert data.accessions == [f"seq{i}" for i in range(50)]
    assert data.offsets[0] == 0 and data.offsets[-1] == data.tokens.size
    assert data.tokens.dtype == np.uint8 and data.offsets.dtype == np.int64
    assert data.attrs["num_sequences"] == 50 and data.attrs["concat_length"] == 64
    assert data.attrs["num_tokens"] == sum(map(len, sequences))
    lengths = np.diff(data.offsets)
    order = concat_order(sequence_hashes(data.tokens, lengths), 3)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    stream = joined_in_order(data.tokens, data.offsets, order)
    rows = stream.size // 64
    assert data.concat.shape == (rows, 64)
    np.testing.assert_array_equal(data.concat.reshape(-1), stream[: rows * 64])
    other_seed = read_split(write_split(tmp_path / "b.h5", sequences, concat_length=64, seed=4))
    assert not np.array_equal(other_seed.concat, data.concat)
    with h5py.File(path) as handle:
        assert handle["accessions"].dtype == h5py.string_dtype()
        assert handle["tokens"].chunks is not None


def test_write_split_accepts_token_arrays_and_empty(tmp_path):
    arrays = [tokenizer.encode("MKV"), tokenizer.encode("AC")]
    data = read_split(write_split(tmp_path / "a.h5", arrays, ["x", "y"], concat_length=100))
    assert data.accessions == ["x", "y"] and data.concat.shape == (0, 100)
    empty = read_split(write_split(tmp_path / "e.h5", [], concat_length=8))
    assert len(empty) == 0 and empty.concat.shape == (0, 8) and empty.offsets.tolist() == [0]
    with pytest.raises(ValueError, match="residue ids"):
        write_split(tmp_path / "bad.h5", [np.array([tokenizer.EOS, 5])])
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "bad.h5.partial").exists()


def test_assign_splits_fractions_and_ood():
    hashes = np.random.default_rng(0).integers(0, 2**63, 200_000, dtype=np.uint64) * np.uint64(2)
    held = np.zeros(len(hashes), bool)
    held[:1000] = True
    labels = assign_splits(hashes, held, 0.05, 0.10)
    counts = np.bincount(labels, minlength=4) / len(hashes)
    assert abs(counts[1] - 0.05) < 0.005 and abs(counts[2] - 0.10) < 0.005
    assert (labels[:1000] == OOD).all() and (labels[1000:] != OOD).all()
    with pytest.raises(ValueError):
        assign_splits(hashes, held, 0.6, 0.6)


def build(tmp_path, batches, name="out", **options) -> dict:
    options = {"valid_fraction": 0.2, "test_fraction": 0.2, "concat_length": 32, **options}
    builder = DatasetBuilder(tmp_path / f"{name}-spill", **options)
    for item in batches:
        builder.add(item)
    (tmp_path / name).mkdir()
    stats = builder.finish(tmp_path / name)
    assert not any((tmp_path / f"{name}-spill").iterdir())  # the spill is cleaned up
    return stats


def contents(folder) -> dict[str, list[tuple[str, str]]]:
    result = {}
    for name in SPLITS:
        data = read_split(folder / f"{name}.h5")
        result[name] = [
            (data.accessions[i], tokenizer.decode(data.sequence(i))) for i in range(len(data))
        ]
    return result


# Small hash partitions and concat buckets: TrEMBL's memory-bounded path at test size.
SMALL_PARTS = {"partition_records": 16, "bucket_records": 10}


@pytest.mark.parametrize("options", [{}, SMALL_PARTS], ids=["whole", "partitioned"])
def test_duplicates_ood_wins_and_no_sequence_in_two_splits(tmp_path, options):
    unique = random_sequences(300, seed=1)
    shared = unique[0]
    batches = [
        batch(unique[:150], [f"A{i}" for i in range(150)]),
        # unique[0] again, now with a held-out family: the sequence must go to ood only.
        batch([shared, unique[1], unique[1]], ["B0", "B1", "B2"], [True, False, False]),
        batch(unique[150:], [f"A{i}" for i in range(150, 300)], [i < 160 for i in range(150, 300)]),
    ]
    stats = build(tmp_path, batches, **options)
    assert stats["records_read"] == 303 and stats["unique_sequences"] == 300
    assert stats["duplicates_dropped"] == 3 and stats["duplicated_sequences"] == 2
    assert stats["duplicates_with_and_without_held_out_family"] == 1
    found = contents(tmp_path / "out")
    everything = [seq for items in found.values() for _, seq in items]
    assert sorted(everything) == sorted(unique)  # each sequence exactly once
    assert ("B0", shared) in found["ood"]  # the held-out copy, under its own accession
    ood = {seq for _, seq in found["ood"]}
    assert ood == {shared, *unique[150:160]}
    assert ("A1", unique[1]) in [item for items in found.values() for item in items]
    for name in SPLITS:
        assert stats["splits"][name]["sequences"] == len(found[name])
    assert all(len(found[name]) > 20 for name in ("train", "valid", "test"))
    # Within a split, input order is kept.
    train_accessions = [a for a, _ in found["train"]]
    assert train_accessions == sorted(train_accessions, key=lambda a: (a[0], int(a[1:])))


def test_splits_do_not_depend_on_input_order(tmp_path):
    sequences = random_sequences(400, seed=2)
    names = [f"P{i}" for i in range(400)]
    build(tmp_path, [batch(sequences, names)], name="forward")
    build(tmp_path, [batch(sequences[::-1], names[::-1])], name="backward")
    forward, backward = contents(tmp_path / "forward"), contents(tmp_path / "backward")
    for name in SPLITS:
        assert sorted(forward[name]) == sorted(backward[name])
        np.testing.assert_array_equal(
            read_split(tmp_path / "forward" / f"{name}.h5").concat,
            read_split(tmp_path / "backward" / f"{name}.h5").concat,
        )


def test_external_concat_buckets_match_in_memory(tmp_path, monkeypatch):
    sequences = random_sequences(600, seed=3)
    items = [
        batch(sequences[i : i + 100], [f"Q{j}" for j in range(i, i + 100)])
        for i in range(0, 600, 100)
    ]
    build(tmp_path, items, name="one", seed=7)
    used = set()
    original = DatasetBuilder._bucket_path

    def recording(self, split, bucket):
        used.add((split, bucket))
        return original(self, split, bucket)

    monkeypatch.setattr(DatasetBuilder, "_bucket_path", recording)
    whole = build(tmp_path, items, name="many", seed=7, bucket_tokens=2_000)
    assert len({bucket for split, bucket in used if split == 0}) > 20  # train: many buckets
    used.clear()
    monkeypatch.setattr(build_module, "_JOIN_RECORDS", 7)  # buckets joined 7 records at a time
    parts = build(tmp_path, items, name="parts", seed=7, **SMALL_PARTS)
    assert len({bucket for split, bucket in used if split == 0}) > 20  # buckets by records
    assert parts == whole
    for name in SPLITS:
        one = read_split(tmp_path / "one" / f"{name}.h5")
        for other in ("many", "parts"):
            many = read_split(tmp_path / other / f"{name}.h5")
            np.testing.assert_array_equal(one.concat, many.concat)
            np.testing.assert_array_equal(one.tokens, many.tokens)
            assert one.accessions == many.accessions
        # and both equal the documented definition
        order = concat_order(sequence_hashes(one.tokens, np.diff(one.offsets)), 7)
        stream = joined_in_order(one.tokens, one.offsets, order)
        assert one.concat.size == stream.size // 32 * 32
        np.testing.assert_array_equal(one.concat.reshape(-1), stream[: one.concat.size])


def test_hash_partitions_cover_every_record_once_and_keep_equal_hashes_together():
    rng = np.random.default_rng(5)
    hashes = rng.integers(0, 2**64 - 1, 100_000, dtype=np.uint64, endpoint=True)
    hashes[50_000:60_000] = hashes[:10_000]  # 10,000 repeated hashes
    parts = list(hash_partitions(hashes, 4_096))
    assert len(parts) == 32  # 2**ceil(log2(100,000 / 4,096))
    part_of = np.full(len(hashes), -1)
    for number, members in enumerate(parts):
        assert (np.diff(members) > 0).all()  # ascending: input order within a partition
        assert (part_of[members] == -1).all()
        part_of[members] = number
        assert len(members) < 4_096
    assert (part_of >= 0).all()
    np.testing.assert_array_equal(part_of[50_000:60_000], part_of[:10_000])
    assert list(hash_partitions(hashes, len(hashes))) == [slice(None)]


def test_pass_two_raises_the_open_file_limit_for_many_buckets(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 24  # room for the spill and HDF5 files, not more
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        sequences = random_sequences(400, seed=9)
        stats = build(tmp_path, [batch(sequences, [f"R{i}" for i in range(400)])], bucket_records=2)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > low + 100  # ~200 buckets open
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert stats["unique_sequences"] == 400
    found = contents(tmp_path / "out")
    assert sorted(seq for items in found.values() for _, seq in items) == sorted(sequences)
