"""LightningModules: the unidirectional (causal) and bidirectional (masked) protein LMs.

Both wrap :class:`protperf.model.PerformerLM` and differ only in their objective
(:mod:`protperf.objectives`: next token, or BERT's masking drawn from a seed per sample), applied
to the data module's batches on the CPU before the device transfer. Metrics are logged as
``{train,valid,test,ood}/{accuracy,perplexity}``.

Features are redrawn every ``redraw_every`` steps from a seed derived from the global step,
identical on all ranks and in a resumed run; ``redraw_until`` stops the redraws at a step, so
that the model trains its last steps on, and is evaluated with, the one draw it keeps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from protperf.data.paper import SPLITS
from protperf.model import PerformerConfig, PerformerLM
from protperf.objectives import MaskingConfig, mean_loss, objective_batch, token_statistics
from protperf.seeds import derive_seed

_REDRAW_SALT = 0x72656472  # "redr"


@dataclass
class OptimConfig:
    """Optimiser and schedule. Defaults: the paper's (Adam 0.9/0.98, constant lr, no warmup)."""

    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's beta1, beta2."""
    eps: float = 1e-9
    """Adam's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW), on 2-D parameters only."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after the warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    decay_steps: int | None = None
    """Length of the cosine, warmup included; None: trainer.max_steps."""
    min_lr_ratio: float = 0.1
    """Cosine floor, as a fraction of lr."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("lr and eps must be positive and weight_decay non-negative")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def lr_multiplier(
    step: int, *, warmup_steps: int, schedule: str, decay_steps: int | None, min_ratio: float
) -> float:
    """Factor applied to the base lr at optimizer step ``step`` (linear warmup, then constant/cosine)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    assert decay_steps is not None
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Metrics: sums that data-parallel ranks reduce before the ratio is taken
# ---------------------------------------------------------------------------------------------


class TokenMean(Metric):
    """Mean of a per-token quantity over the counted tokens: sum(value * counted) / sum(counted).

    The two sums are the metric's state, summed across ranks before the ratio is taken, so the
    result equals the single-process value however the tokens are sharded.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, counted: Tensor) -> None:
        """values, counted: (N,) per-token values and 0/1 weights."""
        self.total += (values.double() * counted).sum()
        self.count += counted.double().sum()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


class Perplexity(TokenMean):
    """exp of the token-weighted mean cross-entropy."""

    def compute(self) -> Tensor:
        return torch.exp(super().compute())


class LMMetrics(nn.Module):
    """Token-weighted accuracy and perplexity of one split."""

    def __init__(self, *, sync_on_step: bool = False) -> None:
        super().__init__()
        self.accuracy = TokenMean(dist_sync_on_step=sync_on_step)
        self.perplexity = Perplexity(dist_sync_on_step=sync_on_step)

    def forward(self, nll: Tensor, correct: Tensor, counted: Tensor) -> dict[str, Tensor]:
        """Accumulate and return this batch's values (reduced across ranks when syncing on step).

        nll, correct, counted: (N,) per-token cross-entropy, 0/1 correctness, 0/1 counted.
        """
        return {
            "accuracy": self.accuracy(correct, counted),
            "perplexity": self.perplexity(nll, counted),
        }

    def update(self, nll: Tensor, correct: Tensor, counted: Tensor) -> None:
        self.accuracy.update(correct, counted)
        self.perplexity.update(nll, counted)


# ---------------------------------------------------------------------------------------------
# LightningModules
# ---------------------------------------------------------------------------------------------


class ProteinLM(pl.LightningModule):
    """Shared training logic; subclasses define :meth:`prepare_batch` (the objective).

    Batches from :class:`protperf.data.datamodule.ProteinDataModule` are dicts with ``tokens``
    (B, L) int64, ``padding_mask`` (B, L) bool or None, ``sample_seed`` (B,) int64 and ``split``
    (str). :meth:`prepare_batch` turns them (on the CPU, before the device transfer) into
    ``inputs``, ``targets`` and ``padding_mask`` for the model.
    """

    causal: ClassVar[bool]
    mode: ClassVar[str]

    def __init__(
        self,
        model: PerformerConfig | dict[str, Any] | None = None,
        optim: OptimConfig | dict[str, Any] | None = None,
        *,
        redraw_every: int = 1000,
        redraw_until: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        model_config = _as(PerformerConfig, model)
        if model_config.causal != self.causal:
            model_config = replace(model_config, causal=self.causal)
        self.optim = _as(OptimConfig, optim)
        if redraw_every < 0:
            raise ValueError(f"redraw_every must be >= 0 (0 = never), got {redraw_every}")
        if redraw_until < 0:
            raise ValueError(f"redraw_until must be >= 0 (0 = to the end), got {redraw_until}")
        self.redraw_every = redraw_every
        self.redraw_until = redraw_until
        self.seed = seed
        self.model = PerformerLM(model_config)
        for split in SPLITS:  # attributes, not a ModuleDict: "train" would shadow Module.train
            setattr(self, f"{split}_metrics", LMMetrics(sync_on_step=split == "train"))
        self._redrawn_at = -1
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(self._hparams())

    def _hparams(self) -> dict[str, Any]:
        return {
            "model": self.model.config.to_dict(),
            "optim": asdict(self.optim),
            "redraw_every": self.redraw_every,
            "redraw_until": self.redraw_until,
            "seed": self.seed,
        }

    @property
    def config(self) -> PerformerConfig:
        return self.model.config

    def forward(
        self, tokens: Tensor, padding_mask: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Model outputs for (B, L) tokens; see :meth:`protperf.model.PerformerLM.forward`."""
        return self.model(tokens, padding_mask, **kwargs)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Data-module batch -> {"inputs", "targets", "padding_mask", "split"} (see subclasses)."""
        raise NotImplementedError

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "tokens" in batch:
            return self.prepare_batch(batch)
        return batch

    def compute_step(self, batch: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """(mean loss over predicted tokens, per-token (nll, correct, counted)) for a prepared batch."""
        out = self.model(batch["inputs"], batch.get("padding_mask"))
        nll, correct, counted = token_statistics(out["logits"], batch["targets"])
        return mean_loss(nll, counted), (nll, correct, counted)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, stats = self.compute_step(batch)
        values = self.train_metrics(*stats)
        size = batch["inputs"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/accuracy", values["accuracy"], batch_size=size)
        self.log("train/perplexity", values["perplexity"], prog_bar=True, batch_size=size)
        return loss

    def _evaluate(self, batch: dict[str, Any]) -> None:
        split = batch.get("split") or (
            "test" if self._trainer is not None and self.trainer.testing else "valid"
        )
        _, stats = self.compute_step(batch)
        metrics: LMMetrics = getattr(self, f"{split}_metrics")
        metrics.update(*stats)
        for name in ("accuracy", "perplexity"):
            self.log(
                f"{split}/{name}",
                getattr(metrics, name),
                on_step=False,
                on_epoch=True,
                add_dataloader_idx=False,
                prog_bar=name == "perplexity",
            )

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Every rank computes the same seed from the global step, so features agree everywhere;
        # a resumed run redraws at the same steps. Evaluation never redraws.
        step = self.global_step
        if (
            self.redraw_every
            and step
            and step % self.redraw_every == 0
            and step != self._redrawn_at
            and (not self.redraw_until or step < self.redraw_until)
        ):
            self.model.redraw_features(derive_seed(self.seed, _REDRAW_SALT, step))
            self._redrawn_at = step

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.optim
        # AdamW: weight decay decoupled from the adaptive update (lr * wd * w per step).
        optimizer = torch.optim.AdamW(
            self.model.optimizer_groups(optim.weight_decay),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
        )
        decay_steps = optim.decay_steps
        if optim.schedule == "cosine" and decay_steps is None:
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            if max_steps is None or max_steps < 0:
                raise ValueError("the cosine schedule needs optim.decay_steps or trainer.max_steps")
            decay_steps = max_steps
        settings = {
            "warmup_steps": optim.warmup_steps,
            "schedule": optim.schedule,
            "decay_steps": decay_steps,
            "min_ratio": optim.min_lr_ratio,
        }
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, **settings)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # Dropout draws from the global RNG: keep its state in the checkpoint so that a resumed run
    # continues exactly as an uninterrupted one (as tensors, loadable with weights_only=True).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states", {})
        if "cpu" in states:
            torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])


class UnidirectionalLM(ProteinLM):
    """Causal LM: over ``<bos> sequence <eos>`` (or a concat chunk), predict each next token."""

    causal = True
    mode = "unidirectional"

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """tokens (B, L) -> inputs (B, L-1) = tokens[:, :-1], targets (B, L-1) = tokens[:, 1:]."""
        return objective_batch(batch, causal=True)


class BidirectionalLM(ProteinLM):
    """Masked LM: corrupt residues per :class:`MaskingConfig`, predict the selected ones."""

    causal = False
    mode = "bidirectional"

    def __init__(
        self,
        model: PerformerConfig | dict[str, Any] | None = None,
        optim: OptimConfig | dict[str, Any] | None = None,
        masking: MaskingConfig | dict[str, Any] | None = None,
        *,
        redraw_every: int = 1000,
        redraw_until: int = 0,
        seed: int = 0,
    ) -> None:
        self.masking = _as(MaskingConfig, masking)
        super().__init__(
            model, optim, redraw_every=redraw_every, redraw_until=redraw_until, seed=seed
        )

    def _hparams(self) -> dict[str, Any]:
        return {**super()._hparams(), "masking": asdict(self.masking)}

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """tokens (B, L) -> inputs (B, L) corrupted, targets (B, L) at the selected residues.

        Draws come from ``batch["sample_seed"]`` (per sample) when present, else the global RNG.
        """
        return objective_batch(batch, causal=False, masking=self.masking)


class WatchPeers(pl.Callback):
    """Starts this process's watch of the others (:mod:`protperf.peers`) once Lightning has set
    up the process group of a multi-process run: a lost process stops the others, each with a
    message naming it and saying ``resume``."""

    def __init__(self, *, prog: str, resume: str) -> None:
        self.prog, self.resume = prog, resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from protperf.peers import watch_peers

        launcher = getattr(trainer.strategy, "launcher", None)
        watch_peers(rank=trainer.global_rank, world_size=trainer.world_size, prog=self.prog,
                    resume=self.resume, children=getattr(launcher, "procs", ()))  # fmt: skip


class TrainingClock(pl.Callback):
    """Logs ``time/train_seconds``: wall time spent in training steps (forward, backward,
    optimiser), validation and checkpointing excluded, so runs compare by compute, not by how
    often they were evaluated. Logged with every training log row and at each validation; kept
    in checkpoints, so a resumed run continues its clock."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
        pl_module.log("time/train_seconds", self.seconds, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("time/train_seconds", self.seconds)

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.seconds = float(state_dict["seconds"])


MODULES: dict[str, type[ProteinLM]] = {
    "unidirectional": UnidirectionalLM,
    "bidirectional": BidirectionalLM,
}


def _as(cls: type, value: Any) -> Any:
    """A dataclass instance from an instance, a dict of its fields or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


__all__ = [
    "MODULES",
    "BidirectionalLM",
    "LMMetrics",
    "OptimConfig",
    "Perplexity",
    "ProteinLM",
    "TokenMean",
    "TrainingClock",
    "UnidirectionalLM",
    "lr_multiplier",
]
