"""Records -> deduplicated, split, tokenized HDF5 files, in bounded memory.

Design (TrEMBL 2019_01: 139 M records, 49 G residues, on a machine with a few GB of RAM):

Pass 1, :meth:`DatasetBuilder.add`, while the download streams: each batch's tokens and
accessions are appended to spill files, and per record only 13 bytes stay: a 64-bit xxh3 hash
of the token ids, the length (uint32) and the held-out flag, also spilled to files.

Between the passes, on those arrays alone, in hash partitions of at most ``partition_records``
records (sequences that could be equal share a partition: the sort's order and temporaries stay
at a few hundred MB whatever the record count):

- *dedupe*: a stable sort by (hash, length, not held-out) groups equal sequences; the first of
  each group is kept, so a sequence that appears with and without a held-out Pfam family is
  kept once, **in ood** (its first held-out copy), never in train (it would leak the held-out
  family into training). Two different sequences are merged only if both their 64-bit hashes
  and lengths agree: about 1e-6 chance for the whole of TrEMBL.
- *split*: held-out -> ood; the others by their hash: ``u = hash / 2**64``, valid if
  ``u < valid_fraction``, test if ``u < valid_fraction + test_fraction``, else train. The split
  of a sequence depends on its residues only, not on the input order, the seed or the release.
- *concat order*: sorted by ``splitmix64(hash ^ splitmix64(seed))``, a seeded shuffle that is
  again independent of the input order.

Pass 2 reads the spill once, in input order: each split's sequences go to its HDF5 file (input
order), and to the split's *buckets*: the concat order is cut into ranges of the shuffle key
holding about ``bucket_tokens`` tokens and at most about ``bucket_records`` records each, each
spilled to its own file (a split smaller than that is one bucket, kept in memory). Each bucket
is then read back, put in key order, joined with ``<eos>`` and cut into ``concat`` rows: an
external shuffle whose memory is one bucket. Every per-record array is transformed slice by
slice, never copied whole. Peak memory is about 21 bytes per record (shuffle keys, lengths,
labels, the largest split's member indices and bucket numbers) plus a fixed few hundred MB and
one bucket: a few GB for TrEMBL's 139 M records (``benchmarks/prepare_memory.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import xxhash

from protperf import tokenizer
from protperf.data.h5 import SplitWriter
from protperf.data.paper import (  # re-exported: the split names and the paper's defaults
    PAPER_TEST_FRACTION,
    PAPER_VALID_FRACTION,
    SPLITS,
)
from protperf.data.records import RecordBatch
from protperf.durable import sync_parent, sync_tree
from protperf.seeds import MASK64, splitmix64

TRAIN, VALID, TEST, OOD = range(4)
DROPPED = 255
DEFAULT_BUCKET_TOKENS = 256 << 20
#: At most this many records per concat bucket: joining a bucket makes a Python bytes object per
#: record (about 150 bytes each with its offsets), 150 MB at this size.
DEFAULT_BUCKET_RECORDS = 1 << 20
#: Dedupe and split in hash partitions of at most this many records (about 70 bytes per record
#: of sort order and temporaries: 300 MB).
DEFAULT_PARTITION_RECORDS = 1 << 22
#: Records per piece when a concat bucket is joined in shuffled order (about 25 MB of TrEMBL).
_JOIN_RECORDS = 1 << 16
#: Records per slice when a per-record array is transformed (hashes -> keys -> bucket ids).
_SLICE = 1 << 20
_EOS = bytes([tokenizer.EOS])


def _windows(count: int) -> Iterator[slice]:
    """``range(count)`` in slices of ``_SLICE``: per-record arrays are transformed a slice at a
    time, so that no temporary is ever as large as the array."""
    return (slice(start, start + _SLICE) for start in range(0, count, _SLICE))


def sequence_hashes(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """xxh3-64 of each sequence's token ids: uint64 (n,) for back-to-back ``tokens``."""
    view = memoryview(np.ascontiguousarray(tokens, dtype=np.uint8))
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter(
        (digest(view[a:b]) for a, b in zip(starts, ends, strict=True)),
        dtype=np.uint64,
        count=len(ends),
    )


def concat_keys(hashes: np.ndarray, seed: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Seeded shuffle keys (uint64) of sequences given their hashes; concat order sorts them.

    Computed slice by slice (no full-size temporaries); ``out`` (uint64, may be ``hashes``
    itself) receives them.
    """
    salt = splitmix64(np.array([seed & MASK64], dtype=np.uint64))
    hashes = np.asarray(hashes, dtype=np.uint64)
    keys = np.empty(len(hashes), dtype=np.uint64) if out is None else out
    for window in _windows(len(hashes)):
        keys[window] = splitmix64(hashes[window] ^ salt)
    return keys


def concat_order(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Indices of sequences in concat order: stable argsort of :func:`concat_keys`."""
    return np.argsort(concat_keys(hashes, seed), kind="stable")


def assign_splits(
    hashes: np.ndarray, held_out: np.ndarray, valid_fraction: float, test_fraction: float
) -> np.ndarray:
    """Split ids (uint8: TRAIN, VALID, TEST, OOD) from sequence hashes and held-out flags."""
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction > 1:
        raise ValueError(
            f"need 0 <= valid_fraction, test_fraction and their sum <= 1, "
            f"got {valid_fraction} and {test_fraction}"
        )
    position = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
    labels = np.full(len(hashes), TRAIN, dtype=np.uint8)
    labels[position < valid_fraction + test_fraction] = TEST
    labels[position < valid_fraction] = VALID
    labels[np.asarray(held_out, dtype=bool)] = OOD
    return labels


def build_concat_chunks(
    tokens: np.ndarray, lengths: np.ndarray, order: np.ndarray, concat_length: int
) -> np.ndarray:
    """Sequences in ``order``, each followed by ``<eos>``, cut into rows of ``concat_length``.

    ``tokens``: uint8 back to back, ``lengths``: (n,); returns uint8 (chunks, concat_length);
    the tail that does not fill a row is dropped.
    """
    stream = np.frombuffer(_join_sequences(tokens, lengths, order, _EOS), dtype=np.uint8)
    rows = stream.size // concat_length
    return stream[: rows * concat_length].reshape(rows, concat_length)


def _join_sequences(
    tokens: np.ndarray | bytes,
    lengths: np.ndarray,
    select: np.ndarray,
    separator: bytes | None,
    *,
    ends: np.ndarray | None = None,
) -> bytes:
    """Tokens of sequences ``select`` (indices into ``lengths``) joined, each followed by
    ``separator``; without separator, runs of consecutive indices are copied in one piece.
    ``ends``: ``np.cumsum(lengths)`` when the caller has it (joins a group at a time)."""
    if not len(select):
        return b""
    # Slicing bytes copies small pieces faster than making memoryviews of them.
    view = tokens if isinstance(tokens, bytes) else memoryview(np.ascontiguousarray(tokens))
    ends = np.cumsum(lengths) if ends is None else ends
    starts = ends - lengths
    select = np.asarray(select, dtype=np.int64)
    if separator:
        pieces = [
            view[a:b] for a, b in zip(starts[select].tolist(), ends[select].tolist(), strict=True)
        ]
        return separator.join(pieces) + separator
    breaks = np.flatnonzero(np.diff(select) != 1) + 1
    first = select[np.concatenate(([0], breaks))]
    last = select[np.concatenate((breaks - 1, [len(select) - 1]))]
    whole = len(first) == 1 and starts[first[0]] == 0 and ends[last[0]] == len(tokens)
    if isinstance(tokens, bytes) and whole:
        return tokens  # the whole buffer, in order: no copy
    return b"".join(
        view[a:b] for a, b in zip(starts[first].tolist(), ends[last].tolist(), strict=True)
    )


class ConcatChunker:
    """Cuts a stream of token bytes (fed piece by piece) into rows of ``concat_length``."""

    def __init__(self, concat_length: int) -> None:
        self.concat_length = concat_length
        self._tail = b""

    def feed(self, data: bytes) -> np.ndarray:
        """The full rows that ``data`` completes, uint8 (k, concat_length); the rest is kept."""
        if self._tail:
            data = self._tail + data
        rows = len(data) // self.concat_length
        cut = rows * self.concat_length
        self._tail = data[cut:]
        return np.frombuffer(data, dtype=np.uint8, count=cut).reshape(rows, self.concat_length)


def length_stats(lengths: np.ndarray, *, overwrite: bool = False) -> dict[str, float | int]:
    """Table-1-style statistics of sequence lengths: count, min, max, mean, median.

    ``overwrite``: ``lengths`` is a scratch copy that the median may reorder (saves a copy).
    """
    if not len(lengths):
        return {"count": 0, "min": 0, "max": 0, "mean": 0.0, "median": 0.0}
    return {
        "count": len(lengths),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean(dtype=np.float64)), 2),
        "median": float(np.median(lengths, overwrite_input=overwrite)),
    }


def split_totals(labels: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences and tokens per split (int64 (4,) each), slice by slice (no full-size copies)."""
    counts = np.zeros(len(SPLITS), dtype=np.int64)
    tokens = np.zeros(len(SPLITS), dtype=np.int64)
    for window in _windows(len(labels)):
        counts += np.bincount(labels[window], minlength=DROPPED + 1)[: len(SPLITS)]
        sums = np.bincount(labels[window], weights=lengths[window], minlength=DROPPED + 1)
        tokens += sums[: len(SPLITS)].astype(np.int64)
    return counts, tokens


def hash_partitions(hashes: np.ndarray, max_records: int) -> Iterator[slice | np.ndarray]:
    """Index sets (ascending) that partition the records by the top bits of their hashes, each
    of about ``max_records`` records or fewer: records with equal hashes share one. A single
    ``slice(None)`` when all fit in one."""
    if len(hashes) <= max_records:
        yield slice(None)
        return
    bits = min(16, math.ceil(math.log2(len(hashes) / max_records)))
    top = np.empty(len(hashes), dtype=np.uint8 if bits <= 8 else np.uint16)
    for window in _windows(len(hashes)):
        top[window] = hashes[window] >> np.uint64(64 - bits)
    for part in range(1 << bits):
        yield np.flatnonzero(top == part)


def dedupe_and_split(
    hashes: np.ndarray,
    lengths: np.ndarray,
    held: np.ndarray,
    valid_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (uint8 (n,): a split, or DROPPED for a duplicate) of records in input order.

    Records with equal (hash, length) are one sequence; the first held-out copy is kept if there
    is one, else the first copy. Also returns the counts (duplicates dropped, duplicated
    sequences, sequences seen with and without a held-out family) as int64 (3,).
    """
    count = len(hashes)
    order = np.lexsort((~held, lengths, hashes))
    sorted_hashes, sorted_lengths = hashes[order], lengths[order]
    first = np.ones(count, dtype=bool)
    first[1:] = (sorted_hashes[1:] != sorted_hashes[:-1]) | (
        sorted_lengths[1:] != sorted_lengths[:-1]
    )
    del sorted_hashes, sorted_lengths
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, count))
    keep = order[first]
    # The first of a group is held out if any copy is (held-out copies sort first).
    mixed = 0
    if count:
        not_held_sorted = ~held[order]
        mixed = int((held[keep] & np.logical_or.reduceat(not_held_sorted, starts)).sum())
    del order, first
    labels = np.full(count, DROPPED, dtype=np.uint8)
    labels[keep] = assign_splits(hashes[keep], held[keep], valid_fraction, test_fraction)
    return labels, np.array([count - len(keep), int((sizes > 1).sum()), mixed], dtype=np.int64)


class DatasetBuilder:
    """Collects record batches (pass 1) and writes the split files (pass 2); see the module doc.

    ``workdir`` holds the spill files (about 1.05 bytes per residue plus 25 bytes per record);
    it must not be shared with anything else.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        valid_fraction: float = PAPER_VALID_FRACTION,
        test_fraction: float = PAPER_TEST_FRACTION,
        concat_length: int = 8192,
        seed: int = 0,
        compression: str = "none",
        bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
        bucket_records: int = DEFAULT_BUCKET_RECORDS,
        partition_records: int = DEFAULT_PARTITION_RECORDS,
    ) -> None:
        assign_splits(np.zeros(0, np.uint64), np.zeros(0, bool), valid_fraction, test_fraction)
        if concat_length < 1:
            raise ValueError(f"concat_length must be positive, not {concat_length}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.valid_fraction = valid_fraction
        self.test_fraction = test_fraction
        self.concat_length = concat_length
        self.seed = seed
        self.compression = compression
        self.bucket_tokens = bucket_tokens
        self.bucket_records = bucket_records
        self.partition_records = partition_records
        self._files = {
            name: open(self.workdir / name, "wb")  # noqa: SIM115 - closed in finish()
            for name in ("tokens.u8", "accessions.txt", "hashes.u64", "lengths.u32", "held.u8")
        }
        #: Concat buckets of the splits that fit in one bucket: kept in memory (pass 2).
        self._in_memory: dict[int, list[bytes]] = {}
        #: Per batch: (records, tokens, accession bytes), to read the spill back batch by batch.
        self._batches: list[tuple[int, int, int]] = []
        self.records = 0
        self.tokens = 0
        self.unknown = 0

    def add(self, batch: RecordBatch) -> None:
        """Spill a batch of records (pass 1)."""
        if not len(batch):
            return
        if int(batch.lengths.max(initial=0)) >= 2**32:
            raise ValueError("a sequence longer than 2**32 residues")
        accessions = b"\n".join(batch.accessions) + b"\n"
        if accessions.count(b"\n") != len(batch):
            raise ValueError("an accession contains a newline")
        files = self._files
        files["tokens.u8"].write(memoryview(np.ascontiguousarray(batch.tokens, dtype=np.uint8)))
        files["accessions.txt"].write(accessions)
        files["hashes.u64"].write(sequence_hashes(batch.tokens, batch.lengths).tobytes())
        files["lengths.u32"].write(batch.lengths.astype(np.uint32).tobytes())
        files["held.u8"].write(batch.held_out.astype(np.uint8).tobytes())
        self._batches.append((len(batch), int(batch.tokens.size), len(accessions)))
        self.records += len(batch)
        self.tokens += int(batch.tokens.size)
        self.unknown += batch.unknown

    def finish(self, out_dir: str | Path) -> dict:
        """Dedupe, split and write ``{train,valid,test,ood}.h5`` into ``out_dir`` (pass 2).

        Returns the statistics for the manifest (counts and lengths per split, duplicates).
        The spill files are deleted.
        """
        out_dir = Path(out_dir)
        for handle in self._files.values():
            handle.close()
        hashes = np.fromfile(self.workdir / "hashes.u64", dtype=np.uint64)
        lengths = np.fromfile(self.workdir / "lengths.u32", dtype=np.uint32)
        labels, duplicates = self._dedupe_and_split(hashes, lengths)
        keys = concat_keys(hashes, self.seed, out=hashes)  # in place: the hashes are done
        del hashes
        counts, token_counts = split_totals(labels, lengths)
        buckets = [
            max(
                1,
                math.ceil((token_counts[s] + counts[s]) / self.bucket_tokens),
                math.ceil(counts[s] / self.bucket_records),
            )
            for s in range(len(SPLITS))
        ]
        writers = [
            SplitWriter(
                out_dir / f"{name}.h5",
                name,
                concat_length=self.concat_length,
                seed=self.seed,
                compression=self.compression,
            )
            for name in SPLITS
        ]
        try:
            self._write_sequences(writers, labels, lengths, keys, buckets)
            for split, writer in enumerate(writers):
                self._write_concat(
                    writer, split, int(counts[split]), labels, lengths, keys, buckets[split]
                )
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        for name in self._files:
            (self.workdir / name).unlink()
        splits = {}
        for split, (name, writer) in enumerate(zip(SPLITS, writers, strict=True)):
            splits[name] = {
                "sequences": writer.num_sequences,
                "tokens": writer.num_tokens,
                "concat_chunks": writer.concat_chunks,
                "lengths": length_stats(lengths[labels == split], overwrite=True),
            }
        return {
            "records_read": self.records,
            "residues_read": self.tokens,
            "unknown_residues_mapped_to_x": self.unknown,
            **duplicates,
            "unique_sequences": int(counts.sum()),
            "lengths": length_stats(lengths[labels != DROPPED], overwrite=True),
            "splits": splits,
        }

    def _dedupe_and_split(self, hashes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, dict]:
        """:func:`dedupe_and_split` over hash partitions: labels (uint8 (n,)) and the counts."""
        held = np.fromfile(self.workdir / "held.u8", dtype=np.uint8).view(bool)
        labels = np.empty(len(hashes), dtype=np.uint8)
        totals = np.zeros(3, dtype=np.int64)
        for members in hash_partitions(hashes, self.partition_records):
            labels[members], counts = dedupe_and_split(
                hashes[members], lengths[members], held[members],
                self.valid_fraction, self.test_fraction,
            )  # fmt: skip
            totals += counts
        dropped, duplicated, mixed = totals.tolist()
        return labels, {
            "duplicates_dropped": dropped,
            "duplicated_sequences": duplicated,
            "duplicates_with_and_without_held_out_family": mixed,
        }

    def _bucket_of(self, keys: np.ndarray, buckets: int) -> np.ndarray:
        """Concat bucket (uint32) of each shuffle key: ``buckets`` equal ranges of the key."""
        return (((keys >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)).astype(np.uint32)

    def _bucket_path(self, split: int, bucket: int) -> Path:
        return self.workdir / f"concat-{SPLITS[split]}-{bucket}.u8"

    def _write_sequences(
        self,
        writers: Sequence[SplitWriter],
        labels: np.ndarray,
        lengths: np.ndarray,
        keys: np.ndarray,
        buckets: Sequence[int],
    ) -> None:
        bucket_files: dict[tuple[int, int], object] = {}
        _allow_open_files(sum(count for count in buckets if count > 1))
        first = 0
        try:
            with (
                open(self.workdir / "tokens.u8", "rb") as token_file,
                open(self.workdir / "accessions.txt", "rb") as accession_file,
            ):
                for records, num_tokens, accession_bytes in self._batches:
                    tokens = token_file.read(num_tokens)
                    accessions = accession_file.read(accession_bytes).split(b"\n")
                    window = slice(first, first + records)
                    batch_labels, batch_lengths = labels[window], lengths[window]
                    for split, writer in enumerate(writers):
                        select = np.flatnonzero(batch_labels == split)
                        if not len(select):
                            continue
                        data = _join_sequences(tokens, batch_lengths, select, None)
                        writer.append(
                            data, batch_lengths[select], [accessions[i] for i in select.tolist()]
                        )
                        if buckets[split] == 1:  # small enough to stay in memory
                            self._in_memory.setdefault(split, []).append(data)
                            continue
                        bucket = self._bucket_of(keys[window][select], buckets[split])
                        by_bucket = np.argsort(bucket, kind="stable")
                        grouped = _join_sequences(tokens, batch_lengths, select[by_bucket], None)
                        sizes = np.bincount(
                            bucket, weights=batch_lengths[select], minlength=buckets[split]
                        ).astype(np.int64)
                        position = 0
                        for number in np.flatnonzero(sizes).tolist():
                            end = position + int(sizes[number])
                            self._append(bucket_files, (split, number), grouped[position:end])
                            position = end
                    first += records
        finally:
            for handle in bucket_files.values():
                handle.close()  # type: ignore[attr-defined]
        for writer in writers:
            writer.flush()

    def _append(self, files: dict, key: tuple[int, int], data: bytes) -> None:
        if key not in files:
            files[key] = open(self._bucket_path(*key), "wb")  # noqa: SIM115 - closed by caller
        files[key].write(data)

    def _write_concat(
        self,
        writer: SplitWriter,
        split: int,
        count: int,
        labels: np.ndarray,
        lengths: np.ndarray,
        keys: np.ndarray,
        buckets: int,
    ) -> None:
        members = _members(labels, split, count)
        if buckets > 1:
            bucket = np.empty(len(members), dtype=np.uint16 if buckets <= 1 << 16 else np.uint32)
            for window in _windows(len(members)):
                bucket[window] = self._bucket_of(keys[members[window]], buckets)
        chunker = ConcatChunker(self.concat_length)
        for number in range(buckets):
            records = members if buckets == 1 else members[bucket == number]
            if buckets == 1:
                data = b"".join(self._in_memory.pop(split, []))
            else:
                path = self._bucket_path(split, number)
                if not path.exists():
                    continue
                data = path.read_bytes()
                path.unlink()
            record_lengths = lengths[records].astype(np.int64)
            ends = np.cumsum(record_lengths)
            if int(ends[-1] if len(ends) else 0) != len(data):
                raise RuntimeError(f"bucket {number}: {len(data)} tokens, expected more")
            order = np.argsort(keys[records], kind="stable")
            # Joined a group at a time: the bucket plus a few MB, not two or three copies of it.
            for start in range(0, len(order), _JOIN_RECORDS):
                group = order[start : start + _JOIN_RECORDS]
                joined = _join_sequences(data, record_lengths, group, _EOS, ends=ends)
                writer.append_concat(chunker.feed(joined))


def _allow_open_files(extra: int) -> None:
    """Make room for ``extra`` more open files (every concat bucket of pass 2 is one: a billion
    records make a thousand) by raising the soft limit, as far as the hard limit allows."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows has no such limit to raise
        return
    try:
        already = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        already = 256
    needed = already + extra + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def _members(labels: np.ndarray, split: int, count: int) -> np.ndarray:
    """Indices of the ``count`` records labelled ``split``, ascending: uint32 while they fit
    (half the memory of int64 for a split of 100 M records), filled slice by slice."""
    members = np.empty(count, dtype=np.uint32 if len(labels) <= 1 << 32 else np.int64)
    filled = 0
    for window in _windows(len(labels)):
        found = np.flatnonzero(labels[window] == split)
        members[filled : filled + len(found)] = found + window.start
        filled += len(found)
    return members


def _as_tokens(sequence: str | bytes | np.ndarray) -> np.ndarray:
    if isinstance(sequence, str | bytes):
        return tokenizer.encode(sequence.upper())
    array = np.asarray(sequence)
    if array.ndim != 1 or (
        array.size
        and (array.min() < tokenizer.FIRST_RESIDUE_ID or array.max() >= tokenizer.VOCAB_SIZE)
    ):
        raise ValueError("token arrays must be 1-D residue ids (no special tokens)")
    return array.astype(np.uint8)


def write_split(
    path: str | Path,
    sequences: Iterable[str | bytes | np.ndarray],
    accessions: Iterable[str] | None = None,
    *,
    split: str = "train",
    concat_length: int = 8192,
    seed: int = 0,
    compression: str = "none",
) -> Path:
    """Write a split file from in-memory sequences, exactly as ``prepare-data`` would.

    ``sequences``: residue strings (``"MKV..."``, letters outside the vocabulary become X) or
    1-D arrays of residue token ids; ``accessions``: one per sequence (default ``seq0, seq1,
    ...``). Sequences are written in the given order (no dedupe, no split); ``concat`` holds
    them in the seeded shuffled order of the pipeline (:func:`concat_order`). The file appears
    atomically at ``path``, which is returned. For tests and demos of training and embedding:

        >>> write_split(tmp / "train.h5", ["MKTAYIAK", "MSEQ"], concat_length=8)  # doctest: +SKIP
    """
    path = Path(path)
    arrays = [_as_tokens(sequence) for sequence in sequences]
    names = [f"seq{i}" for i in range(len(arrays))] if accessions is None else list(accessions)
    if len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} sequences but {len(names)} accessions")
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint8)
    temporary = path.with_name(path.name + ".partial")
    writer = SplitWriter(
        temporary, split, concat_length=concat_length, seed=seed, compression=compression
    )
    try:
        writer.append(tokens.tobytes(), lengths, [str(name) for name in names])
        order = concat_order(sequence_hashes(tokens, lengths), seed)
        writer.append_concat(build_concat_chunks(tokens, lengths, order, concat_length))
        writer.close()
    except BaseException:
        writer.abort()
        temporary.unlink(missing_ok=True)
        raise
    sync_tree(temporary)
    temporary.replace(path)
    sync_parent(path)
    return path
