"""Batches for training and evaluation, read from prepare-data's HDF5 files.

Layout read (one file per split, ``<data>/{train,valid,test,ood}.h5``): ``tokens`` (uint8, all
residues back to back), ``offsets`` (int64, N+1), ``concat`` (uint8, (chunks, concat_length)).

Two modes:

* single sequences: ``<bos> sequence <eos>``, randomly cropped to ``max_length`` tokens (a crop
  keeps <bos>/<eos> only where it reaches the sequence's start/end), padded per batch; batches of
  ``batch_size`` sequences, or of at most ``token_budget`` padded tokens (length-bucketed);
* concat: the ``concat`` chunks (uncropped sequences each followed by <eos>), L = 8,192 in the paper.

Every sample has a ``sample_seed`` derived from (seed, epoch, index) in training and (seed, index)
in evaluation; crops (here) and masks (in :mod:`protperf.lit`) are drawn from it, so the data a
model sees does not depend on worker count, DDP world size or interruptions.
HDF5 files are opened lazily in the process that reads them (each DataLoader worker). Training
batches are built for the whole data-parallel group from the same seeded order and dealt round
robin, so every rank gets the same number of batches; evaluation shards are not padded, so
metrics are computed on each sample exactly once. The position in the epoch is saved with each
checkpoint and a resumed run continues from the next batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from protperf.data.paper import SPLITS
from protperf.seeds import derive_seed
from protperf.tokenizer import BOS, EOS, PAD

EVAL_EPOCH = -1  # the "epoch" of evaluation seeds: crops are fixed across evaluations


@dataclass
class LoaderConfig:
    """How batches are formed and loaded (per device)."""

    batch_size: int = 32
    """Sequences (or concat chunks) per batch and device."""
    eval_batch_size: int | None = None
    """Batch size of evaluation; None: batch_size."""
    token_budget: int | None = None
    """Single-sequence mode: batches of at most this many padded tokens (length-bucketed)."""
    bucket_by_length: bool = False
    """Sort within pools by length to reduce padding (always on with token_budget)."""
    pool_size: int = 64
    """Batches per sorting pool when bucketing."""
    num_workers: int = 2
    """DataLoader worker processes (each opens the HDF5 files itself)."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""
    pin_memory: bool = True
    """Pinned host memory for faster copies (used only when CUDA is available)."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or (self.eval_batch_size is not None and self.eval_batch_size <= 0):
            raise ValueError("batch sizes must be positive")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError("token_budget must be positive")
        if self.num_workers < 0 or self.pool_size <= 0:
            raise ValueError("num_workers must be >= 0 and pool_size positive")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random draws (crop here, masks in the LightningModule)."""
    return derive_seed(seed, epoch, index)


# ---------------------------------------------------------------------------------------------
# Datasets (indexed by (index, sample_seed) pairs from the batch samplers)
# ---------------------------------------------------------------------------------------------


class _H5Split(Dataset):
    """One split file, opened on first use in each process (never shared across a fork)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._file: h5py.File | None = None
        self._pid = -1

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        return state


class SequenceDataset(_H5Split):
    """Single sequences as ``<bos> seq <eos>`` (uint8), randomly cropped to ``max_length``."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        super().__init__(path)
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        self.max_length = max_length
        with h5py.File(self.path, "r") as f:
            self.num_sequences = len(f["offsets"]) - 1

    def __len__(self) -> int:
        return self.num_sequences

    def lengths(self) -> np.ndarray:
        """(N,) int32 lengths in tokens after adding <bos>/<eos> and cropping."""
        with h5py.File(self.path, "r") as f:
            offsets = f["offsets"][:]
        return np.minimum(np.diff(offsets) + 2, self.max_length).astype(np.int32)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, seed = key
        start, end = self.file["offsets"][index : index + 2]
        full_length = int(end - start) + 2
        # Crop window over <bos> seq <eos>; read only the residues inside it.
        offset = 0
        if full_length > self.max_length:
            offset = int(np.random.default_rng(seed).integers(0, full_length - self.max_length + 1))
        stop = min(full_length, offset + self.max_length)
        out = np.empty(stop - offset, dtype=np.uint8)
        lo, hi = max(offset, 1), min(stop, full_length - 1)  # residue window, in full coordinates
        if hi > lo:
            out[lo - offset : hi - offset] = self.file["tokens"][start + lo - 1 : start + hi - 1]
        if offset == 0:
            out[0] = BOS
        if stop == full_length:
            out[-1] = EOS
        return out, seed


class ConcatDataset(_H5Split):
    """The ``concat`` chunks: sequences joined by <eos>, each chunk (concat_length,) uint8."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        super().__init__(path)
        with h5py.File(self.path, "r") as f:
            if "concat" not in f:
                raise ValueError(f"{self.path} has no 'concat' dataset (re-run prepare-data)")
            self.num_chunks, self.chunk_length = (int(n) for n in f["concat"].shape)
        if self.chunk_length > max_length:
            raise ValueError(
                f"concat chunks of {self.chunk_length} tokens exceed the model's max_length "
                f"{max_length}; set --model.max_length {self.chunk_length}"
            )

    def __len__(self) -> int:
        return self.num_chunks

    def lengths(self) -> np.ndarray:
        return np.full(self.num_chunks, self.chunk_length, dtype=np.int32)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, seed = key
        return self.file["concat"][index], seed


def collate(samples: list[tuple[np.ndarray, int]], split: str) -> dict[str, Any]:
    """Pad a list of (tokens, sample_seed) to the longest.

    Returns ``{"tokens": (B, L) int64, "padding_mask": (B, L) bool or None (no padding),
    "sample_seed": (B,) int64, "split": str}``.
    """
    length = max(len(tokens) for tokens, _ in samples)
    tokens = np.full((len(samples), length), PAD, dtype=np.int64)
    for row, (sample, _) in enumerate(samples):
        tokens[row, : len(sample)] = sample
    batch_tokens = torch.from_numpy(tokens)
    padding = batch_tokens == PAD
    return {
        "tokens": batch_tokens,
        "padding_mask": padding if bool(padding.any()) else None,
        "sample_seed": torch.tensor([seed for _, seed in samples], dtype=torch.int64),
        "split": split,
    }


class _Collate:
    """Picklable collate_fn bound to a split name."""

    def __init__(self, split: str) -> None:
        self.split = split

    def __call__(self, samples: list[tuple[np.ndarray, int]]) -> dict[str, Any]:
        return collate(samples, self.split)


# ---------------------------------------------------------------------------------------------
# Batch samplers
# ---------------------------------------------------------------------------------------------


def pack_by_budget(lengths: np.ndarray, token_budget: int) -> np.ndarray:
    """Sizes of consecutive groups of ``lengths`` (sorted ascending) whose padded size
    (count x longest) stays within ``token_budget``; an item longer than the budget is alone."""
    sizes, start, n = [], 0, len(lengths)
    while start < n:
        window = lengths[start : start + max(1, token_budget // max(1, int(lengths[start])))]
        padded = np.arange(1, len(window) + 1) * window  # increasing: lengths are sorted
        sizes.append(max(1, int(np.searchsorted(padded, token_budget, side="right"))))
        start += sizes[-1]
    return np.asarray(sizes, dtype=np.int64)


@dataclass
class _EpochPlan:
    """Batches of one epoch for one rank: batch j = order[starts[j] : starts[j] + sizes[j]]."""

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, j: int) -> np.ndarray:
        return self.order[self.starts[j] : self.starts[j] + self.sizes[j]]


class TrainBatchSampler:
    """Seeded, sharded, resumable batches of (index, sample_seed) pairs for training.

    Each epoch: a permutation seeded by (seed, epoch); optionally pools of ``pool_size`` batches
    sorted by length and packed by count or token budget, then the batch order shuffled; the
    global batch list is truncated to a multiple of ``world_size`` and dealt round robin (batch j
    to rank j % world_size), so all ranks agree on it and get the same number of batches.
    Memory: O(items) numpy, no per-batch Python objects (the paper's 10^8 sequences fit).
    """

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: np.ndarray | None = None,
        token_budget: int | None = None,
        bucket_by_length: bool = False,
        pool_size: int = 64,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if (token_budget is not None or bucket_by_length) and lengths is None:
            raise ValueError("length bucketing needs the lengths")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.lengths, self.token_budget = lengths, token_budget
        self.bucket = bucket_by_length or token_budget is not None
        self.pool_size = pool_size
        self.epoch = 0
        self.start = 0  # batches of `epoch` already consumed (a resumed run skips them)
        self._cache: tuple[int, _EpochPlan] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def load_position(self, epoch: int, consumed: int) -> None:
        """Resume at batch ``consumed`` of ``epoch`` (the next epoch when that one was finished)."""
        self.epoch, self.start = epoch, consumed
        if consumed >= len(self):
            self.epoch, self.start = epoch + 1, 0

    def plan(self, epoch: int) -> _EpochPlan:
        """This rank's batches of item indices for ``epoch`` (deterministic)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        dtype = np.int32 if self.num_items < 2**31 else np.int64
        order = rng.permutation(self.num_items).astype(dtype, copy=False)
        if not self.bucket:
            count = self.num_items // self.batch_size
            starts = np.arange(count, dtype=np.int64) * self.batch_size
            sizes = np.full(count, self.batch_size, dtype=np.int64)
        else:
            assert self.lengths is not None
            pool_items = self.pool_size * self.batch_size
            all_sizes = []
            for pool_start in range(0, self.num_items, pool_items):
                pool = order[pool_start : pool_start + pool_items]
                pool = pool[np.argsort(self.lengths[pool], kind="stable")]
                order[pool_start : pool_start + len(pool)] = pool
                if self.token_budget is not None:
                    all_sizes.append(pack_by_budget(self.lengths[pool], self.token_budget))
                else:
                    sizes = np.full(
                        -(-len(pool) // self.batch_size), self.batch_size, dtype=np.int64
                    )
                    sizes[-1] = len(pool) - self.batch_size * (len(sizes) - 1)
                    all_sizes.append(sizes)
            sizes = np.concatenate(all_sizes)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            shuffle = rng.permutation(len(sizes))
            starts, sizes = starts[shuffle], sizes[shuffle]
        usable = len(starts) - len(starts) % self.world_size
        plan = _EpochPlan(
            order,
            starts[self.rank : usable : self.world_size],
            sizes[self.rank : usable : self.world_size],
        )
        self._cache = (epoch, plan)
        return plan

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self):
        epoch, start = self.epoch, self.start
        self.start = 0  # the skip applies once
        plan = self.plan(epoch)
        for j in range(start, len(plan)):
            yield [(int(i), sample_seed(self.seed, epoch, int(i))) for i in plan.batch(j)]


class EvalBatchSampler:
    """Evaluation batches: items rank, rank + world, ... in order (no padding, no duplicates)."""

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: np.ndarray | None = None,
        token_budget: int | None = None,
    ) -> None:
        items = np.arange(rank, num_items, world_size)
        if token_budget is not None and lengths is not None:
            items = items[np.argsort(lengths[items], kind="stable")]
            bounds = np.cumsum(pack_by_budget(lengths[items], token_budget))[:-1]
            self._batches = np.split(items, bounds)
        else:
            self._batches = [items[j : j + batch_size] for j in range(0, len(items), batch_size)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for batch in self._batches:
            yield [(int(i), sample_seed(self.seed, EVAL_EPOCH, int(i))) for i in batch]


# ---------------------------------------------------------------------------------------------
# The data module
# ---------------------------------------------------------------------------------------------


class ProteinDataModule(pl.LightningDataModule):
    """Train / valid / test / ood loaders over ``<data_dir>/{split}.h5``.

    Args:
        data_dir: folder written by ``protperf prepare-data``.
        concat: read the ``concat`` chunks instead of single sequences.
        max_length: crop length in tokens including <bos>/<eos> (the model's ``max_length``).
        loader: batching and worker settings.
        seed: seed of the epoch order, crops and (via sample seeds) masks.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        concat: bool = False,
        max_length: int = 1024,
        loader: LoaderConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.concat = concat
        self.max_length = max_length
        self.loader = loader or LoaderConfig()
        self.seed = seed
        self.datasets: dict[str, SequenceDataset | ConcatDataset] = {}
        self.train_sampler: TrainBatchSampler | None = None
        self._resume: tuple[int, int] | None = None

    def _path(self, split: str) -> Path:
        return self.data_dir / f"{split}.h5"

    def _dataset(self, split: str) -> SequenceDataset | ConcatDataset | None:
        """The split's dataset, or None when its file is absent or empty."""
        if split not in self.datasets:
            path = self._path(split)
            if not path.exists():
                if split == "train":
                    raise FileNotFoundError(f"{path} not found: run `protperf prepare-data` first")
                return None
            cls = ConcatDataset if self.concat else SequenceDataset
            self.datasets[split] = cls(path, self.max_length)
        dataset = self.datasets[split]
        return dataset if len(dataset) else None

    def check(self) -> None:
        """Open every split now, so that a wrong ``data_dir`` fails before a run starts.

        Raises FileNotFoundError (no folder, no train.h5) or ValueError naming the file and the
        problem: not an HDF5 file of prepare-data's layout, no ``concat`` dataset or chunks longer
        than ``max_length`` in concat mode, or a train split without a single item.
        """
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"{self.data_dir}: no such folder (run `protperf prepare-data` first)"
            )
        for split in SPLITS:
            try:
                self._dataset(split)
            except FileNotFoundError:
                raise
            except (OSError, KeyError) as error:  # h5py: not HDF5, or a dataset missing
                raise ValueError(
                    f"{self._path(split)}: not a protperf dataset ({error}); "
                    "re-run `protperf prepare-data`"
                ) from error
        if self._dataset("train") is None:
            what = "concat chunks" if self.concat else "sequences"
            hint = (
                " (fewer tokens than one chunk: a smaller --concat-length)" if self.concat else ""
            )
            raise ValueError(f"{self._path('train')}: the train split holds no {what}{hint}")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, batch_sampler: Any, split: str) -> DataLoader:
        workers = self.loader.num_workers
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=_Collate(split),
            num_workers=workers,
            prefetch_factor=self.loader.prefetch_factor if workers else None,
            pin_memory=self.loader.pin_memory and torch.cuda.is_available(),
            # An explicit generator keeps iterator creation from consuming the global RNG
            # (dropout's), so a resumed run draws exactly what an uninterrupted one would.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _needs_lengths(self) -> bool:
        return not self.concat and (
            self.loader.token_budget is not None or self.loader.bucket_by_length
        )

    def _train_sampler(self, rank: int, world: int) -> TrainBatchSampler:
        """The train split's batch sampler for one rank; ValueError naming the file when the
        split has no item or fewer than one batch per rank."""
        dataset = self._dataset("train")
        what = "concat chunks" if self.concat else "sequences"
        if dataset is None:
            raise ValueError(f"{self._path('train')}: the train split holds no {what}")
        sampler = TrainBatchSampler(
            len(dataset),
            batch_size=self.loader.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            lengths=dataset.lengths() if self._needs_lengths() else None,
            token_budget=None if self.concat else self.loader.token_budget,
            bucket_by_length=self.loader.bucket_by_length and not self.concat,
            pool_size=self.loader.pool_size,
        )
        if len(sampler) == 0:
            ranks = f" on each of {world} ranks" if world > 1 else ""
            raise ValueError(
                f"{self._path('train')}: the train split's {len(dataset)} {what} make no batch "
                f"of {self.loader.batch_size}{ranks} (a smaller --loader.batch_size, or more data)"
            )
        return sampler

    def check_batches(self, world_size: int = 1) -> None:
        """Raise ValueError (naming the file) unless every rank gets at least one train batch."""
        self._train_sampler(0, world_size)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        rank, world = self._rank_world()
        sampler = self._train_sampler(rank, world)
        if self._resume is not None:
            sampler.load_position(*self._resume)
            self._resume = None
        self.train_sampler = sampler
        return self._loader(dataset, sampler, "train")

    def _eval_loader(self, split: str) -> DataLoader | None:
        dataset = self._dataset(split)
        if dataset is None:
            return None
        rank, world = self._rank_world()
        sampler = EvalBatchSampler(
            len(dataset),
            batch_size=self.loader.eval_batch_size or self.loader.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            lengths=dataset.lengths() if self._needs_lengths() else None,
            token_budget=None if self.concat else self.loader.token_budget,
        )
        return self._loader(dataset, sampler, split)

    def val_dataloader(self) -> DataLoader | list:
        loader = self._eval_loader("valid")
        return loader if loader is not None else []

    def test_dataloader(self) -> list[DataLoader]:
        """The test and ood loaders (those that exist); batches carry their split's name."""
        return [
            loader for split in ("test", "ood") if (loader := self._eval_loader(split)) is not None
        ]

    def eval_dataloader(self, split: str) -> DataLoader | None:
        """Loader of any split in evaluation order (fixed crops), or None when it is absent/empty."""
        return self._eval_loader(split)

    # Resumption: the epoch and how many of its batches the trainer has processed.
    def state_dict(self) -> dict[str, Any]:
        if self.train_sampler is None or self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.train_sampler.epoch, "consumed": int(progress.processed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["consumed"]))


@dataclass
class LoaderThroughput:
    batches_per_s: float
    tokens_per_s: float  # non-padding tokens
    batches: int
    seconds: float


def measure_loader(loader: DataLoader, *, batches: int = 50, warmup: int = 2) -> LoaderThroughput:
    """Time ``batches`` batches of ``loader`` alone (after ``warmup`` batches, workers started)."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    tokens, count = 0, 0
    start = time.perf_counter()
    for batch in iterator:
        mask = batch["padding_mask"]
        tokens += batch["tokens"].numel() - (int(mask.sum()) if mask is not None else 0)
        count += 1
        if count == batches:
            break
    seconds = time.perf_counter() - start
    return LoaderThroughput(count / seconds, tokens / seconds, count, seconds)
