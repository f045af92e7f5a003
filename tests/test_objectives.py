"""The training objectives (protperf.objectives): BERT masking, per-sample draws, the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from protperf.lit import LMMetrics
from protperf.objectives import (
    IGNORE_INDEX,
    MaskingConfig,
    mask_tokens,
    masked_batch,
    next_token_batch,
    sample_uniforms,
    token_statistics,
)
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, MASK, PAD


def test_mask_tokens_on_a_hand_made_example():
    tokens = torch.tensor([[BOS, 5, 6, 7, 8, 9, EOS, PAD]])
    # columns: select (< 0.15 selects), kind (< 0.8 mask, < 0.9 random, else keep), random pick
    uniforms = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0],  # <bos>: never selected
                [0.1, 0.5, 0.0],  # selected -> <mask>
                [0.1, 0.85, 0.99],  # selected -> random residue, the last one (id 29)
                [0.1, 0.95, 0.0],  # selected -> kept
                [0.2, 0.0, 0.0],  # not selected
                [0.14, 0.79, 0.0],  # selected -> <mask>
                [0.0, 0.0, 0.0],  # <eos>: never selected
                [0.0, 0.0, 0.0],  # <pad>: never selected
            ]
        ]
    )
    inputs, targets = mask_tokens(tokens, uniforms)
    assert inputs.tolist() == [[BOS, MASK, 29, 7, 8, MASK, EOS, PAD]]
    assert targets.tolist() == [
        [IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]
    ]


def test_masking_statistics_are_15_percent_and_80_10_10():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(FIRST_RESIDUE_ID, 30, (400, 1000), generator=generator)
    tokens[:, 0], tokens[:, -1] = BOS, EOS
    tokens[:, -100:] = PAD  # padding and specials are never selected
    residues = tokens >= FIRST_RESIDUE_ID
    inputs, targets = mask_tokens(tokens, sample_uniforms(list(range(400)), 1000))
    selected = targets != IGNORE_INDEX
    assert not (selected & ~residues).any()
    n = int(selected.sum())
    assert abs(n / int(residues.sum()) - 0.15) < 0.003
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    assert abs(int(masked.sum()) / n - 0.8) < 0.01
    # kept (10%) plus random draws that hit the original residue (10% / 25)
    assert abs(int(unchanged.sum()) / n - (0.1 + 0.1 / 25)) < 0.01
    random = selected & ~masked & ~unchanged
    assert abs(int(random.sum()) / n - 0.1 * 24 / 25) < 0.01
    assert (inputs[random] >= FIRST_RESIDUE_ID).all() and (inputs[random] < 30).all()
    assert torch.equal(inputs[~selected], tokens[~selected])


def test_masking_is_configurable():
    tokens = torch.randint(
        FIRST_RESIDUE_ID, 30, (50, 400), generator=torch.Generator().manual_seed(1)
    )
    inputs, targets = mask_tokens(
        tokens,
        sample_uniforms(list(range(50)), 400),
        mask_prob=0.3,
        mask_token_prob=1.0,
        random_token_prob=0.0,
    )
    selected = targets != IGNORE_INDEX
    assert abs(selected.float().mean().item() - 0.3) < 0.01
    assert (inputs[selected] == MASK).all()
    with pytest.raises(ValueError):
        MaskingConfig(mask_token_prob=0.8, random_token_prob=0.3)


def test_sample_uniforms_are_per_sample_and_independent_of_padding():
    a = sample_uniforms([3, 4], 10)
    b = sample_uniforms([4, 3, 9], 50)
    assert a.shape == (2, 10, 3)
    torch.testing.assert_close(a[0], b[1, :10])
    torch.testing.assert_close(a[1], b[0, :10])
    assert not torch.allclose(a[0], a[1])
    assert (a >= 0).all() and (a < 1).all()


def test_metric_values_on_a_hand_made_example():
    # Two positions counted, one ignored (padding): logits favour class 5 everywhere.
    logits = torch.full((1, 3, 30), -20.0)
    logits[..., 5] = 0.0
    logits[..., 6] = math.log(1 / 3)  # p(6) = (1/3) / (1 + 1/3) = 0.25, p(5) = 0.75
    targets = torch.tensor([[5, 6, IGNORE_INDEX]])
    nll, correct, counted = token_statistics(logits, targets)
    assert counted.tolist() == [1.0, 1.0, 0.0] and correct.tolist() == [1.0, 0.0, 0.0]
    metrics = LMMetrics()
    metrics.update(nll, correct, counted)
    expected_ppl = math.exp((-math.log(0.75) - math.log(0.25)) / 2)
    assert metrics.accuracy.compute().item() == pytest.approx(0.5)
    assert metrics.perplexity.compute().item() == pytest.approx(expected_ppl, rel=1e-5)
    # A second batch with 3 counted, all correct: token-weighted (4/5), not a mean of batch means.
    logits2 = torch.full((1, 3, 30), -20.0)
    logits2[..., 5] = 0.0
    metrics.update(*token_statistics(logits2, torch.tensor([[5, 5, 5]])))
    assert metrics.accuracy.compute().item() == pytest.approx(4 / 5)
    nll_total = (
        -math.log(0.75) - math.log(0.25) + 3 * -torch.log_softmax(logits2[0, 0], -1)[5].item()
    )
    assert metrics.perplexity.compute().item() == pytest.approx(math.exp(nll_total / 5), rel=1e-5)


def test_next_token_batch_shifts_and_ignores_padding():
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD], [BOS, 7, 8, 9, 10, EOS]])
    inputs, targets, padding = next_token_batch(tokens, tokens == PAD)
    assert inputs.tolist() == [[BOS, 5, 6, EOS, PAD], [BOS, 7, 8, 9, 10]]
    assert targets.tolist() == [[5, 6, EOS, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, 10, EOS]]
    assert padding.tolist() == [[False, False, False, False, True], [False] * 5]


def test_masked_batch_draws_from_the_sample_seeds_whatever_the_batch():
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(FIRST_RESIDUE_ID, 30, (3, 200), generator=generator)
    alone, alone_targets, _ = masked_batch(tokens[1:2, :120], None, [42])
    together, together_targets, _ = masked_batch(tokens, None, [7, 42, 8])
    assert torch.equal(alone[0], together[1, :120])
    assert torch.equal(alone_targets[0], together_targets[1, :120])
    assert not torch.equal(together_targets[0], together_targets[2])
