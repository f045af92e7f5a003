"""The LightningModules: masking, metrics, objectives, schedule, feature redraw, overfitting."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from lm_models import TINY_MODEL

from protperf.lit import (
    BidirectionalLM,
    LMMetrics,
    MaskingConfig,
    OptimConfig,
    UnidirectionalLM,
    lr_multiplier,
    mask_tokens,
    sample_uniforms,
    token_statistics,
)
from protperf.model import IGNORE_INDEX, PerformerConfig, derive_seed
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, MASK, PAD

TINY = TINY_MODEL


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


def test_unidirectional_batch_is_shifted_and_padding_ignored():
    module = UnidirectionalLM(TINY)
    assert module.model.config.causal
    tokens = torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, PAD]])
    prepared = module.prepare_batch(
        {"tokens": tokens, "padding_mask": tokens == PAD, "split": "valid"}
    )
    assert prepared["inputs"].tolist() == [[BOS, 5, 6], [BOS, 7, EOS]]
    assert prepared["targets"].tolist() == [[5, 6, EOS], [7, EOS, IGNORE_INDEX]]
    assert prepared["padding_mask"] is None  # the only padding was the last input position's target
    assert prepared["split"] == "valid"


def test_bidirectional_masks_follow_the_sample_seeds():
    module = BidirectionalLM(TINY, masking={"mask_prob": 0.5})
    assert not module.model.config.causal
    tokens = torch.randint(
        FIRST_RESIDUE_ID, 30, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    batch = {"tokens": tokens, "padding_mask": None, "sample_seed": torch.tensor([11, 12])}
    first, again = module.prepare_batch(batch), module.prepare_batch(batch)
    assert torch.equal(first["inputs"], again["inputs"])
    swapped = module.prepare_batch({**batch, "sample_seed": torch.tensor([12, 11])})
    assert not torch.equal(first["targets"], swapped["targets"])
    # A sample's mask does not depend on its neighbours in the batch.
    alone = module.prepare_batch(
        {"tokens": tokens[1:], "padding_mask": None, "sample_seed": torch.tensor([12])}
    )
    assert torch.equal(alone["targets"][0], first["targets"][1])


def test_learning_rate_schedules():
    kwargs = {"warmup_steps": 10, "decay_steps": 110, "min_ratio": 0.1}
    assert lr_multiplier(0, schedule="constant", **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="constant", **kwargs) == 1.0
    assert lr_multiplier(500, schedule="constant", **kwargs) == 1.0
    assert lr_multiplier(10, schedule="cosine", **kwargs) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kwargs) == pytest.approx(0.55)
    assert lr_multiplier(110, schedule="cosine", **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(1000, schedule="cosine", **kwargs) == pytest.approx(0.1)


def test_paper_optimizer_defaults():
    module = UnidirectionalLM(TINY)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        1e-3,
        (0.9, 0.98),
        1e-9,
        0.1,
    )
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert OptimConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)


def _batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(FIRST_RESIDUE_ID, 30, (4, 24), generator=generator)
    tokens[:, 0], tokens[:, -1] = BOS, EOS
    tokens[2, 15:] = PAD
    tokens[2, 14] = EOS
    return {"tokens": tokens, "padding_mask": tokens == PAD, "sample_seed": torch.arange(4) + seed}


@pytest.mark.parametrize("kernel", ["softmax", "relu", "exact"])
@pytest.mark.parametrize("module_class", [UnidirectionalLM, BidirectionalLM])
def test_tiny_model_overfits_one_batch(module_class, kernel):
    torch.manual_seed(0)
    module = module_class({**TINY, "kernel": kernel}, {"lr": 1e-2, "weight_decay": 0.0})
    optimizer = module.configure_optimizers()["optimizer"]
    prepared = module.prepare_batch(_batch())
    initial = module.compute_step(prepared)[0].item()
    for _ in range(150):
        loss, _ = module.compute_step(prepared)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = module.compute_step(prepared)[0].item()
    assert initial > 2.5
    assert final < 0.1, f"{module_class.__name__}/{kernel}: loss {initial:.3f} -> {final:.3f}"


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return _batch(index)


@pytest.mark.parametrize(
    ("redraw_until", "max_steps", "last_redraw"), [(0, 5, 4), (5, 9, 4), (4, 7, 2)]
)
def test_features_are_redrawn_from_the_global_step_and_fixed_in_evaluation(
    tmp_path, redraw_until, max_steps, last_redraw
):
    module = BidirectionalLM(
        {**TINY, "kernel": "softmax"}, redraw_every=2, redraw_until=redraw_until, seed=5
    )
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=None)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    # Redraws before steps 2, 4, ... below redraw_until: the features are those of the last.
    reference = PerformerConfig(**{**TINY, "kernel": "softmax"})
    expected = BidirectionalLM(reference, redraw_every=2, seed=5).model
    expected.redraw_features(derive_seed(5, 0x72656472, last_redraw))
    for got, want in zip(module.model.blocks, expected.blocks, strict=True):
        torch.testing.assert_close(got.attn.attention.projection, want.attn.attention.projection)
    before = module.model.blocks[0].attn.attention.projection.clone()
    trainer.validate(module, dataloaders=loader, verbose=False)
    assert torch.equal(module.model.blocks[0].attn.attention.projection, before)
    assert "valid/perplexity" in trainer.callback_metrics
