"""Trained models in and out: safetensors + config.json + tokenizer.json, nothing unpickled.

An exported folder holds ``model.safetensors`` (the :class:`~protperf.model.PerformerLM` weights,
random features included), ``config.json`` (``{"model": PerformerConfig fields, "mode": ...}``)
and ``tokenizer.json``. :func:`read_model` reads that folder, a training run folder, or a
Lightning ``.ckpt`` (with ``torch.load(weights_only=True)``); :func:`protperf.load_model` also
takes the name of a packaged model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from protperf import __version__
from protperf.durable import replace_folder
from protperf.model import PerformerConfig, PerformerLM
from protperf.tokenizer import save_tokenizer_json

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def export_model(
    model: PerformerLM, out_dir: str | Path, *, mode: str, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/{model.safetensors, config.json, tokenizer.json}``; returns ``out_dir``.

    ``mode`` is "unidirectional" or "bidirectional"; ``metadata`` (JSON-able) goes in config.json.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside ``out`` and renamed into place: ``out`` never holds a half-written export,
    # and a previous export stays whole until the new one is complete.
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        # save_model drops the tied head's duplicate of the embedding (safetensors forbids aliases).
        save_safetensors(model, str(staging / WEIGHTS), metadata={"format": "pt", "mode": mode})
        config = {
            "model": model.config.to_dict(),
            "mode": mode,
            "protperf_version": __version__,
            **(metadata or {}),
        }
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_tokenizer_json(staging / TOKENIZER)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def model_from_state_dict(
    config: PerformerConfig, state_dict: dict[str, torch.Tensor], *, prefix: str = "model."
) -> PerformerLM:
    """A PerformerLM (CPU) holding the weights of a LightningModule's state dict (keys under
    ``prefix``); raises ``RuntimeError`` naming missing or unexpected keys."""
    model = PerformerLM(config)
    weights = {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    model.load_state_dict(weights, strict=True)
    return model


def read_model(path: str | Path, *, device: str | torch.device = "cpu") -> PerformerLM:
    """Load a model for inference (eval mode) from an export folder, a run folder or a .ckpt.

    A run folder resolves to its ``export/`` when present, else ``checkpoints/last.ckpt``. The
    config is ``model.config``. Raises ``FileNotFoundError`` when nothing loadable is found and
    ``RuntimeError`` naming the missing or unexpected keys when the weights do not match the
    config.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in (
            path / WEIGHTS,
            path / "export" / WEIGHTS,
            path / "checkpoints" / "last.ckpt",
        ):
            if candidate.exists():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"no {WEIGHTS}, export/ or checkpoints/last.ckpt in {path}")
    if path.suffix == ".ckpt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        hyper = checkpoint.get("hyper_parameters", {})
        if "model" not in hyper:
            raise ValueError(
                f"{path}: no model config in hyper_parameters (not a protperf checkpoint?)"
            )
        config = PerformerConfig.from_dict(hyper["model"])
        model = model_from_state_dict(config, checkpoint["state_dict"])
    else:
        config_path = path.with_name(CONFIG)
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found beside {path}")
        config = PerformerConfig.from_dict(json.loads(config_path.read_text())["model"])
        model = PerformerLM(config)
        load_safetensors(model, str(path), strict=True)
    return model.to(device).eval()
