"""The data module: crops, padding, concat chunks, seeded sharded resumable batches, throughput."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from lm_data import write_dataset

from protperf.data.build import write_split
from protperf.data.datamodule import (
    ConcatDataset,
    EvalBatchSampler,
    LoaderConfig,
    ProteinDataModule,
    SequenceDataset,
    TrainBatchSampler,
    collate,
    measure_loader,
    pack_by_budget,
)
from protperf.tokenizer import BOS, EOS, PAD, encode


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, proteome_dir):
    fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    return write_dataset(tmp_path_factory.mktemp("lm-data"), fasta, concat_length=128)


def _full(path, index: int) -> np.ndarray:
    with h5py.File(path) as f:
        start, end = f["offsets"][index : index + 2]
        return np.concatenate([[BOS], f["tokens"][start:end], [EOS]]).astype(np.uint8)


def test_short_sequences_are_whole_and_long_ones_cropped(dataset_dir):
    path = dataset_dir / "train.h5"
    dataset = SequenceDataset(path, max_length=64)
    lengths = dataset.lengths()
    assert lengths.max() == 64 and lengths.min() < 64
    crops_seen = set()
    for index in range(40):
        full = _full(path, index)
        for seed in range(5):
            crop, got_seed = dataset[(index, seed)]
            assert got_seed == seed and crop.dtype == np.uint8
            if len(full) <= 64:
                np.testing.assert_array_equal(crop, full)
                continue
            assert len(crop) == 64
            # The crop is a contiguous window of <bos> seq <eos>; specials only at the true ends.
            windows = np.lib.stride_tricks.sliding_window_view(full, 64)
            offset = int(np.flatnonzero((windows == crop).all(axis=1))[0])
            crops_seen.add((index, offset))
            assert (crop[0] == BOS) == (offset == 0)
            assert (crop[-1] == EOS) == (offset == len(full) - 64)
            np.testing.assert_array_equal(dataset[(index, seed)][0], crop)  # deterministic per seed
    assert len(crops_seen) > 20  # different seeds give different windows


def test_collate_pads_and_marks_padding():
    batch = collate(
        [(np.array([1, 5, 6, 2], np.uint8), 7), (np.array([1, 9, 2], np.uint8), 8)], "valid"
    )
    assert batch["tokens"].tolist() == [[1, 5, 6, 2], [1, 9, 2, PAD]]
    assert batch["padding_mask"].tolist() == [[False] * 4, [False, False, False, True]]
    assert batch["sample_seed"].tolist() == [7, 8] and batch["split"] == "valid"
    assert collate([(np.array([1, 5, 2], np.uint8), 0)], "train")["padding_mask"] is None


def test_concat_chunks(dataset_dir):
    dataset = ConcatDataset(dataset_dir / "train.h5", max_length=128)
    assert len(dataset) > 10 and dataset.chunk_length == 128
    chunks = np.stack([dataset[(i, 0)][0] for i in range(len(dataset))])
    assert chunks.shape == (len(dataset), 128) and not (chunks == BOS).any()
    assert 0.5 * 96 < (chunks == EOS).sum() <= 96  # one <eos> after each sequence, tail dropped
    with pytest.raises(ValueError, match="max_length"):
        ConcatDataset(dataset_dir / "train.h5", max_length=100)
    module = ProteinDataModule(
        dataset_dir, concat=True, max_length=128, loader=LoaderConfig(batch_size=4, num_workers=0)
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["tokens"].shape == (4, 128) and batch["padding_mask"] is None


def _flatten(sampler) -> list[list[int]]:
    return [[index for index, _ in batch] for batch in sampler]


def test_train_batches_are_seeded_sharded_and_equal_per_rank():
    def sampler(rank=0, world=1, seed=0):
        return TrainBatchSampler(103, batch_size=4, seed=seed, rank=rank, world_size=world)

    one = sampler()
    epoch0 = _flatten(one)
    assert epoch0 == _flatten(sampler()) and len(epoch0) == 25
    assert epoch0 != _flatten(sampler(seed=1))
    one.set_epoch(1)
    assert _flatten(one) != epoch0
    ranks = [_flatten(sampler(rank, 3)) for rank in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 8  # 25 batches -> 24 dealt
    items = [i for r in ranks for b in r for i in b]
    assert len(items) == len(set(items)) == 96
    # The ranks deal the single-process batch list round robin.
    assert ranks[1] == epoch0[1:24:3]
    # Sample seeds differ by sample and by epoch (new crops and masks each epoch).
    seeds = [dict(p for b in sampler_at(epoch) for p in b) for epoch in (0, 1)]
    common = set(seeds[0]) & set(seeds[1])
    assert len(common) > 50 and all(seeds[0][i] != seeds[1][i] for i in common)
    assert len(set(seeds[0].values())) == len(seeds[0])


def sampler_at(epoch: int) -> TrainBatchSampler:
    sampler = TrainBatchSampler(103, batch_size=4, seed=0)
    sampler.set_epoch(epoch)
    return sampler


def test_resuming_continues_with_the_next_batch():
    reference = TrainBatchSampler(50, batch_size=4, seed=3)
    reference.set_epoch(2)
    expected = list(reference)
    resumed = TrainBatchSampler(50, batch_size=4, seed=3)
    resumed.load_position(epoch=2, consumed=5)
    assert list(resumed) == expected[5:]
    resumed.set_epoch(2)  # Lightning sets the same epoch again: the position holds only once
    assert list(resumed) == expected
    finished = TrainBatchSampler(50, batch_size=4, seed=3)
    finished.load_position(epoch=2, consumed=12)  # a checkpoint taken at the end of epoch 2
    assert finished.epoch == 3 and finished.start == 0


def test_token_budget_and_bucketing():
    lengths = np.random.default_rng(0).integers(10, 300, size=500).astype(np.int32)
    sizes = pack_by_budget(np.sort(lengths), 1000)
    assert sizes.sum() == 500
    sampler = TrainBatchSampler(500, batch_size=8, seed=0, lengths=lengths, token_budget=1000)
    batches = _flatten(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * lengths[b].max() <= 1000 for b in batches)
    assert np.mean([len(b) for b in batches]) > 4  # bucketing packs short sequences together
    bucketed = _flatten(
        TrainBatchSampler(500, batch_size=8, seed=0, lengths=lengths, bucket_by_length=True)
    )
    padded = sum(len(b) * lengths[b].max() for b in bucketed)
    plain = _flatten(TrainBatchSampler(500, batch_size=8, seed=0))
    assert padded < 0.8 * sum(len(b) * lengths[b].max() for b in plain)


def test_eval_shards_cover_every_item_once():
    shards = [
        _flatten(EvalBatchSampler(13, batch_size=3, seed=0, rank=r, world_size=2)) for r in range(2)
    ]
    assert [len(s) for s in shards] == [3, 2]  # uneven on purpose: no padding duplicates
    assert sorted(i for s in shards for b in s for i in b) == list(range(13))
    # Evaluation seeds do not depend on the sharding.
    single = dict(p for b in EvalBatchSampler(13, batch_size=5, seed=0) for p in b)
    sharded = dict(
        p
        for r in range(2)
        for b in EvalBatchSampler(13, batch_size=3, seed=0, rank=r, world_size=2)
        for p in b
    )
    assert single == sharded


def test_batches_do_not_depend_on_workers(dataset_dir):
    def batches(workers: int) -> list[dict]:
        module = ProteinDataModule(
            dataset_dir,
            max_length=48,
            loader=LoaderConfig(batch_size=8, num_workers=workers),
            seed=4,
        )
        return [b for _, b in zip(range(4), module.train_dataloader(), strict=False)]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(
            a["sample_seed"], b["sample_seed"]
        )


def test_splits_and_loaders(dataset_dir, tmp_path):
    module = ProteinDataModule(
        dataset_dir, max_length=64, loader=LoaderConfig(batch_size=8, num_workers=0)
    )
    assert len(module.train_dataloader()) == 96 // 8
    valid = list(module.val_dataloader())
    assert sum(len(b["tokens"]) for b in valid) == 13 and {b["split"] for b in valid} == {"valid"}
    assert [next(iter(dl))["split"] for dl in module.test_dataloader()] == ["test", "ood"]
    # An empty ood split is skipped; a missing train split is a clear error.
    (tmp_path / "d").mkdir()
    write_split(tmp_path / "d" / "train.h5", ["MKV" * 10] * 8, split="train", concat_length=16)
    write_split(tmp_path / "d" / "ood.h5", [], split="ood", concat_length=16)
    small = ProteinDataModule(
        tmp_path / "d", max_length=64, loader=LoaderConfig(batch_size=4, num_workers=0)
    )
    assert small.test_dataloader() == [] and small.val_dataloader() == []
    tokens = next(iter(small.train_dataloader()))["tokens"][0]
    assert tokens.tolist() == [BOS, *encode("MKV" * 10).tolist(), EOS]
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        ProteinDataModule(tmp_path / "nothing").train_dataloader()


def test_loader_throughput_is_measured(dataset_dir):
    module = ProteinDataModule(
        dataset_dir, max_length=64, loader=LoaderConfig(batch_size=8, num_workers=0)
    )
    result = measure_loader(module.train_dataloader(), batches=5)
    assert result.batches == 5 and result.batches_per_s > 0
    assert result.tokens_per_s > result.batches_per_s * 8 * 10
