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
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from protperf import __version__
from protperf.durable import default_file_mode, replace_folder, reporting_full_disk
from protperf.errors import InputError
from protperf.model import PerformerConfig, PerformerLM
from protperf.tokenizer import save_tokenizer_json

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
#: What torch.load raises for a file that is not a checkpoint, or one cut short (random bytes
#: are an UnpicklingError, a text file a KeyError, a truncated archive an OSError or EOFError).
#: The prefixes of the metrics an export records: the splits a finished run is tested on.
TESTED_SPLITS = ("test/", "ood/")
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, OSError, RuntimeError, KeyError, ValueError)


def export_model(
    model: PerformerLM, out_dir: str | Path, *, mode: str, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/{model.safetensors, config.json, tokenizer.json}``; returns ``out_dir``.

    ``mode`` is "unidirectional" or "bidirectional"; ``metadata`` (JSON-able) goes in config.json.
    """
    out = Path(out_dir)
    with reporting_full_disk(out):
        return _export_model(model, out, mode=mode, metadata=metadata)


def _export_model(
    model: PerformerLM, out: Path, *, mode: str, metadata: dict[str, Any] | None
) -> Path:
    staging = staging_folder(out)
    try:
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
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def staging_folder(out: Path) -> Path:
    """An empty ``.<out>.<pid>.partial`` beside ``out``: where an export is written before
    :func:`publish` renames it into place (so ``out`` never holds a half-written export)."""
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: Path) -> Path:
    """Give every file in ``staging`` the permissions of a new file here (safetensors creates
    its files with mode 0600, and an export is shared like any other file), then rename it onto
    ``out``, replacing an earlier ``out`` only once the new one is complete."""
    for path in staging.rglob("*"):
        if path.is_file():
            os.chmod(path, default_file_mode())
    return replace_folder(staging, out)


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
    config is ``model.config``. Raises ``FileNotFoundError`` when nothing loadable is found,
    :class:`InputError` naming the file when it cannot be read (damaged, truncated, not
    safetensors or not a checkpoint) and ``RuntimeError`` naming the missing or unexpected keys
    when the weights do not match the config.
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
        checkpoint = load_checkpoint(path)
        hyper = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
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
        try:
            config = PerformerConfig.from_dict(json.loads(config_path.read_text())["model"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{config_path}: not a protperf config.json ({error})") from error
        model = PerformerLM(config)
        try:
            load_safetensors(model, str(path), strict=True)
        except SafetensorError as error:
            raise InputError(f"{path}: not a readable safetensors file ({error})") from error
    return model.to(device).eval()


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.
    A file that cannot be read so is an :class:`InputError` (see :func:`unreadable_checkpoint`)."""
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign file's pickle protocol
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as error:
        raise unreadable_checkpoint(path, error) from None


def unreadable_checkpoint(path: str | Path, error: Exception) -> Exception:
    """What to raise when ``torch.load(path, weights_only=True)`` raised ``error``: the error
    itself for a missing file or a permission, otherwise an :class:`InputError` naming the file.

    torch's own message for a file holding other Python objects suggests loading it with
    ``weights_only`` turned off, which runs whatever code the file contains: it is never shown.
    """
    if isinstance(error, FileNotFoundError | IsADirectoryError | PermissionError | InputError):
        return error
    if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):
        return InputError(
            f"{path}: the checkpoint holds Python objects other than tensors and plain values, "
            "and protperf never unpickles code: not a protperf checkpoint"
        )
    return InputError(f"{path}: not a PyTorch checkpoint (damaged or truncated?)")


def export_metadata(path: Path) -> dict[str, Any]:
    """What an export's config.json records besides the model (step, data, test metrics), for a
    copy of it; the test metrics of a run folder's logs when its export lacks them."""
    folder = path if path.is_dir() else path.parent
    recorded: dict[str, Any] = {}
    for config in (folder / CONFIG, folder / "export" / CONFIG):
        if config.is_file():
            try:
                recorded = json.loads(config.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                recorded = {}
            break
    skip = {"model", "mode", "protperf_version"}
    metadata = {key: value for key, value in recorded.items() if key not in skip}
    if not metadata.get("metrics"):
        metadata["metrics"] = logged_test_metrics(folder)
    return metadata


def logged_test_metrics(folder: Path) -> dict[str, float]:
    """The test and OOD metrics (``test/perplexity``, ``ood/accuracy`` ...) a run logged last,
    for a run folder or its ``export/``; empty when there are none."""
    from protperf.plot import read_metrics

    run = folder.parent if folder.name == "export" else folder
    try:
        series = read_metrics(run)
    except FileNotFoundError:
        return {}
    return {
        name: values[max(values)]
        for name, values in series.items()
        if name.startswith(TESTED_SPLITS)
    }
