"""The LightningModules: objectives on batches, schedule, feature redraw, overfitting."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from lm_models import TINY_MODEL

from protperf.lit import BidirectionalLM, OptimConfig, UnidirectionalLM, lr_multiplier
from protperf.model import PerformerConfig
from protperf.objectives import IGNORE_INDEX
from protperf.seeds import derive_seed
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, PAD

TINY = TINY_MODEL


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
