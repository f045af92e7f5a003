"""The HDF5 split file: one per split (train, valid, test, ood), written by appends.

Layout of ``<split>.h5`` (N sequences, T tokens, C concat chunks of length L):

- ``tokens``     uint8 (T,): every sequence's token ids back to back, no special tokens;
- ``offsets``    int64 (N+1,): sequence i is ``tokens[offsets[i]:offsets[i+1]]``;
- ``accessions`` (N,) variable-length UTF-8 strings (``h5py.string_dtype()``; read them with
  ``f["accessions"].asstr()[i]``);
- ``concat``     uint8 (C, L): the split's uncropped sequences in a seeded shuffled order, each
  followed by ``<eos>``, cut into non-overlapping chunks (the tail is dropped; C may be 0);
- attributes ``split``, ``num_sequences``, ``num_tokens``, ``concat_length``, ``concat_chunks``,
  ``seed``, ``format_version``, ``protperf_version``.

Storage: everything is chunked; by default only ``accessions`` is compressed (lzf). Token ids of
proteins are nearly incompressible (lzf saves about a sixth), while a compressed chunk must be
decoded whole for every random read of one sequence, which makes the data loader's random
access an order of magnitude slower; the same holds for ``offsets``, which shuffle+lzf would
shrink but whose two-element reads it would slow down most. ``--compression`` turns lzf or gzip
on for ``tokens`` and ``concat`` where disk matters more than loading speed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from protperf import __version__
from protperf.data.errors import DataError
from protperf.durable import check_writes, close_h5, create_h5

FORMAT_VERSION = 1
TOKEN_CHUNK = 1 << 16
_INDEX_CHUNK = 1 << 14
_FLUSH_TOKENS = 32 << 20
_FLUSH_RECORDS = 1 << 18
COMPRESSIONS = ("none", "lzf", "gzip")


def _filter(compression: str) -> dict:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1}
    return {"compression": "lzf"}


class SplitWriter:
    """Write one split file by appends; :meth:`close` sets the attributes.

    ``append`` takes the next sequences (their tokens back to back, their lengths and
    accessions); ``append_concat`` the next rows of ``concat`` (shape (k, concat_length)).
    Memory: at most about 32 MB of tokens are buffered. A full disk raises ``OSError`` (ENOSPC,
    naming the file) at the next write or at :meth:`close`, never a crash: the file is written
    through :func:`protperf.durable.create_h5`.
    """

    def __init__(
        self,
        path: str | Path,
        split: str,
        *,
        concat_length: int,
        seed: int = 0,
        compression: str = "none",
    ) -> None:
        if concat_length < 1:
            raise ValueError(f"concat_length must be positive, not {concat_length}")
        self.path = Path(path)
        self.split = split
        self.concat_length = concat_length
        self.seed = seed
        self._file = create_h5(self.path)
        big = _filter(compression)
        small = {"compression": "lzf"}
        self._tokens = self._file.create_dataset(
            "tokens", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(TOKEN_CHUNK,),
            track_times=False, **big,
        )  # fmt: skip
        self._offsets = self._file.create_dataset(
            "offsets", data=np.zeros(1, dtype=np.int64), maxshape=(None,),
            chunks=(_INDEX_CHUNK,), track_times=False,
        )  # fmt: skip
        self._accessions = self._file.create_dataset(
            "accessions", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
            chunks=(_INDEX_CHUNK,), track_times=False, **small,
        )  # fmt: skip
        rows = max(1, TOKEN_CHUNK // concat_length)
        self._concat = self._file.create_dataset(
            "concat", shape=(0, concat_length), maxshape=(None, concat_length), dtype=np.uint8,
            chunks=(rows, concat_length), track_times=False, **big,
        )  # fmt: skip
        self.num_sequences = 0
        self.num_tokens = 0
        self.concat_chunks = 0
        self._pending: list[bytes | np.ndarray] = []
        self._pending_lengths: list[np.ndarray] = []
        self._pending_accessions: list[bytes | str] = []
        self._pending_tokens = 0

    def append(
        self,
        tokens: bytes | np.ndarray,
        lengths: np.ndarray,
        accessions: list[bytes] | list[str],
    ) -> None:
        """Add sequences: ``tokens`` (uint8 ids, back to back), ``lengths`` (n,), ``accessions``."""
        if len(lengths) != len(accessions):
            raise ValueError(f"{len(lengths)} lengths but {len(accessions)} accessions")
        self._pending.append(tokens)
        self._pending_lengths.append(np.asarray(lengths, dtype=np.int64))
        self._pending_accessions.extend(accessions)
        self._pending_tokens += len(tokens)
        if self._pending_tokens >= _FLUSH_TOKENS or len(self._pending_accessions) >= _FLUSH_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered sequences."""
        if not self._pending_accessions:
            if self._pending_tokens:
                raise ValueError(f"{self._pending_tokens} tokens without sequences")
            return
        lengths = np.concatenate(self._pending_lengths)
        size = sum(len(piece) for piece in self._pending)
        if int(lengths.sum()) != size:
            raise ValueError(f"lengths add up to {int(lengths.sum())}, tokens are {size}")
        start, count = self.num_tokens, len(lengths)
        if size:
            self._tokens.resize((start + size,))
            position = start
            for piece in self._pending:  # piece by piece: no joined copy
                if len(piece):
                    array = np.frombuffer(piece, dtype=np.uint8)
                    self._tokens[position : position + array.size] = array
                    position += array.size
        offsets = start + np.cumsum(lengths)
        self._offsets.resize((self.num_sequences + count + 1,))
        self._offsets[self.num_sequences + 1 :] = offsets
        self._accessions.resize((self.num_sequences + count,))
        self._accessions[self.num_sequences :] = np.array(self._pending_accessions, dtype=object)
        self.num_sequences += count
        self.num_tokens += size
        self._pending, self._pending_lengths, self._pending_accessions = [], [], []
        self._pending_tokens = 0
        check_writes(self._file)

    def append_concat(self, rows: np.ndarray) -> None:
        """Add rows of ``concat``: uint8, shape (k, concat_length)."""
        if rows.ndim != 2 or rows.shape[1] != self.concat_length:
            raise ValueError(f"concat rows must be (k, {self.concat_length}), not {rows.shape}")
        if not len(rows):
            return
        start = self.concat_chunks
        self._concat.resize((start + len(rows), self.concat_length))
        self._concat[start:] = rows
        self.concat_chunks += len(rows)
        check_writes(self._file)

    def close(self, **attrs: object) -> None:
        """Flush, write the attributes (plus any in ``attrs``) and close the file."""
        self.flush()
        self._file.attrs.update(
            {
                "split": self.split,
                "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens,
                "concat_length": self.concat_length,
                "concat_chunks": self.concat_chunks,
                "seed": self.seed,
                "format_version": FORMAT_VERSION,
                "protperf_version": __version__,
                **attrs,
            }
        )
        close_h5(self._file)

    def abort(self) -> None:
        """Close without finishing (the caller deletes the file)."""
        with contextlib.suppress(OSError):  # the write that failed was raised already
            close_h5(self._file)


@dataclass
class SplitData:
    """A split file read into memory (small files: tests, demos). Fields as in the file."""

    tokens: np.ndarray
    offsets: np.ndarray
    accessions: list[str]
    concat: np.ndarray
    attrs: dict

    def __len__(self) -> int:
        return len(self.accessions)

    def sequence(self, index: int) -> np.ndarray:
        """Token ids of sequence ``index``."""
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def read_split(path: str | Path) -> SplitData:
    """Read a whole split file into memory (see the module docstring for the layout)."""
    with h5py.File(path, "r") as handle:
        return SplitData(
            tokens=handle["tokens"][:],
            offsets=handle["offsets"][:],
            accessions=list(handle["accessions"].asstr()[:]),
            concat=handle["concat"][:],
            attrs=dict(handle.attrs),
        )


def check_split(path: str | Path) -> None:
    """Raise :class:`DataError` naming ``path`` unless it opens as a split file: HDF5 (not
    truncated) with ``tokens`` and ``offsets``. A missing file raises ``FileNotFoundError``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `protperf prepare-data` first")
    try:
        with h5py.File(path, "r") as handle:
            for name in ("tokens", "offsets"):
                if not isinstance(handle.get(name), h5py.Dataset):
                    raise KeyError(f"no {name!r} dataset")
    except (OSError, KeyError) as error:
        reason = str(error).strip("'\"")
        raise DataError(
            f"{path}: not a protperf dataset ({reason}); re-run `protperf prepare-data`"
        ) from error
