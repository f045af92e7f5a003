"""Tiny models for the tests: random ones exported in protperf's format, and training arguments.

``TINY_TRAIN_ARGS`` make ``protperf train`` run a 2-layer, d 32 model in seconds on a CPU;
:func:`export_random_model` writes an untrained model as ``protperf train`` would export it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protperf.export import export_model
from protperf.model import PerformerConfig, PerformerLM

TINY_TRAIN_ARGS = [
    "--model.dim=32",
    "--model.depth=2",
    "--model.heads=4",
    "--model.ff_dim=64",
    "--model.max_length=64",
    "--model.num_features=16",
    "--loader.batch_size=8",
    "--loader.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.val_check_interval=4",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=2",
    "--checkpoint-every=2",
]

TINY_MODEL: dict[str, Any] = {
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "ff_dim": 64,
    "max_length": 64,
    "num_features": 16,
    "dropout": 0.0,
}


def tiny_config(**overrides: Any) -> PerformerConfig:
    """The tiny architecture, with ``overrides`` (e.g. ``kernel="exact"``, ``causal=True``)."""
    return PerformerConfig(**{**TINY_MODEL, **overrides})


def export_random_model(out: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Export an untrained tiny model (weights drawn from ``seed``) to ``out``; returns ``out``."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    mode = "unidirectional" if config.causal else "bidirectional"
    return export_model(PerformerLM(config), out, mode=mode)
