"""Models by name or path: the models packaged with protperf, and the exports of local runs.

``load_model(name_or_path)`` takes the name of a packaged model (a folder of
``protperf/weights/``: ``model.safetensors``, ``config.json``, ``tokenizer.json`` and a
``MODEL_CARD.md``), or the path
of an export folder, a ``protperf train`` run folder or a Lightning ``.ckpt``. The verbs that
run a model (``embed``, ``evaluate``, ``generate``) use :func:`default_model` when no
``--model`` is given: the most recent export under ``./runs``, then a packaged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from protperf.errors import InputError
from protperf.export import CONFIG, WEIGHTS, read_model
from protperf.model import PerformerLM

#: Where packaged models live: one folder per model, named as the model.
PACKAGED_DIR = Path(__file__).resolve().parent / "weights"
#: The packaged model the verbs fall back to (its card: PACKAGED_DIR/<name>/MODEL_CARD.md).
DEFAULT_PACKAGED = "performer-small-uni"
#: Where ``protperf train`` puts its runs by default.
RUNS_DIR = Path("runs")
#: How deep under RUNS_DIR exports are looked for: runs/<run>/export, runs/<group>/<run>/export.
_EXPORT_PATTERNS = (f"*/export/{WEIGHTS}", f"*/*/export/{WEIGHTS}")


def packaged_models() -> dict[str, Path]:
    """{name: folder} of the models shipped inside the package (sorted by name)."""
    if not PACKAGED_DIR.is_dir():
        return {}
    return {
        folder.name: folder
        for folder in sorted(PACKAGED_DIR.iterdir())
        if (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()
    }


def _is_causal(export: Path) -> bool | None:
    try:
        return bool(json.loads((export / CONFIG).read_text())["model"]["causal"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_exports(runs: Path = RUNS_DIR) -> list[Path]:
    """Export folders of the runs under ``runs``, the most recently written first."""
    weights = {path for pattern in _EXPORT_PATTERNS for path in Path(runs).glob(pattern)}
    ordered = sorted(weights, key=lambda path: path.stat().st_mtime, reverse=True)
    return [path.parent for path in ordered]


def default_model(*, causal: bool | None = None, runs: Path = RUNS_DIR) -> Path:
    """The model a verb runs when no ``--model`` is given: the most recent export under
    ``runs`` (a causal one when ``causal`` is True), else a packaged model (DEFAULT_PACKAGED
    where it fits).

    Raises InputError saying how to get a model when there is none.
    """
    for export in local_exports(runs):
        if causal is None or _is_causal(export) == causal:
            return export
    packaged = packaged_models()
    preferred = sorted(packaged, key=lambda name: name != DEFAULT_PACKAGED)  # the default first
    for name in preferred:
        if causal is None or _is_causal(packaged[name]) == causal:
            return packaged[name]
    kind = " causal (unidirectional)" if causal else ""
    raise InputError(
        f"no --model given and no{kind} model exported under {runs}/: train one with "
        "`protperf train` (it exports to <run>/export), or pass --model PATH"
    )


def resolve_model(name_or_path: str | Path) -> Path:
    """A packaged model's folder for its name, else the path itself (which must exist)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    packaged = packaged_models()
    if str(name_or_path) in packaged:
        return packaged[str(name_or_path)]
    names = ", ".join(packaged) or "none"
    raise InputError(
        f"{name_or_path}: no such file or folder, and not a packaged model (packaged: {names})"
    )


def load_model(name_or_path: str | Path, *, device: str | torch.device = "cpu") -> PerformerLM:
    """A model in eval mode on ``device``, by packaged name or by path (export folder, run folder
    or ``.ckpt``; nothing is unpickled). Its settings are ``model.config``.

    Raises InputError for an unknown name or a path that does not exist, FileNotFoundError for
    a folder without a model, RuntimeError for weights that do not match the config.
    """
    return read_model(resolve_model(name_or_path), device=device)
