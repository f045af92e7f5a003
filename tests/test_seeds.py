"""Derived seeds: every (seed, salt...) tuple has its own stream, in every place protperf draws
from one (sample crops and masks, feature draws per layer, generated proteins)."""

from __future__ import annotations

import itertools

import pytest
import torch
from lm_models import export_random_model, tiny_config

from protperf import cli
from protperf.data.datamodule import EVAL_EPOCH, sample_seed
from protperf.model import PerformerLM
from protperf.seeds import derive_seed

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_no_two_seed_and_salt_pairs_collide():
    values = {derive_seed(seed, salt) for seed in range(100) for salt in range(100)}
    assert len(values) == 100 * 100
    swapped = [(a, b) for a, b in itertools.combinations(range(100), 2)]
    assert all(derive_seed(a, b) != derive_seed(b, a) for a, b in swapped)
    assert all(0 <= value < 2**63 for value in values)


def test_values_are_fixed():
    """Every seeded stream of a run (and so a run's results) depends on these values."""
    assert derive_seed(0, 0) == 0x5383_6E97_A68C_BF37
    assert derive_seed(7, -1, 3) == derive_seed(7, 2**64 - 1, 3)  # negative salts wrap


def test_sample_seeds_of_neighbouring_seeds_and_epochs_differ():
    grid = range(10)
    assert all(
        sample_seed(s + 1, e, i) != sample_seed(s, e + 1, i)
        and sample_seed(s, e + 1, i) != sample_seed(s, e, i + 1)
        for s, e, i in itertools.product(grid, grid, grid)
    )
    seeds = {
        sample_seed(s, e, i)
        for s in range(10)
        for e in [EVAL_EPOCH, *range(10)]
        for i in range(100)
    }
    assert len(seeds) == 10 * 11 * 100


def test_feature_draws_of_neighbouring_layers_differ_across_feature_seeds():
    """Layer l of ``feature_seed`` s draws from (s, l): not the features of layer l + 1 with
    ``feature_seed`` s - 1."""

    def projections(feature_seed: int) -> list[torch.Tensor]:
        model = PerformerLM(tiny_config(depth=3, feature_seed=feature_seed))
        return [block.attn.attention.projection for block in model.blocks]

    draws = {seed: projections(seed) for seed in range(3)}
    for (s, first), (t, second) in itertools.combinations(draws.items(), 2):
        for (i, a), (j, b) in itertools.product(enumerate(first), enumerate(second)):
            assert not torch.equal(a, b), (s, i, t, j)


def test_generate_with_neighbouring_seeds_shares_no_protein(tmp_path, capsys):
    model = export_random_model(tmp_path / "model", causal=True)
    proteins = {}
    for seed in (0, 1):
        args = ["generate", "--model", str(model), "-n", "8", "--max-length", "12"]
        assert cli.main([*args, "--seed", str(seed)]) == 0
        fasta = capsys.readouterr().out
        proteins[seed] = [line for line in fasta.splitlines() if not line.startswith(">")]
        assert len(proteins[seed]) == 8
    assert not set(proteins[0]) & set(proteins[1])
