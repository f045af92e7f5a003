"""``protperf models``: the models protperf can run, packaged and trained here, at a glance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from protperf.attention import KERNEL_NAMES
from protperf.commandline import run_verb
from protperf.export import CONFIG, WEIGHTS, logged_test_metrics
from protperf.pretrained import RUNS_DIR, local_exports, packaged_models


@dataclass
class ModelInfo:
    """One model: its name for ``--model`` (a packaged name or a path) and what it is."""

    name: str
    source: str  # "packaged" or "run"
    mode: str
    kernel: str
    shape: str  # layers x width
    parameters: int
    megabytes: float
    test_perplexity: float | None


#: Tensors of an export that are buffers, not parameters (the random features).
_BUFFERS = (".attention.projection",)


def _parameters(weights: Path) -> int:
    """Parameter count from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = [key for key in f.keys() if not key.endswith(_BUFFERS)]  # noqa: SIM118
        return sum(math.prod(f.get_slice(key).get_shape()) for key in keys)


def _test_perplexity(folder: Path, config: dict) -> float | None:
    """The test perplexity recorded in the export, else the last one its run logged."""
    recorded = config.get("metrics", {}).get("test/perplexity")
    if recorded is None:
        recorded = logged_test_metrics(folder).get("test/perplexity")
    return None if recorded is None else float(recorded)


def describe(folder: Path, name: str, source: str) -> ModelInfo:
    """What an export or packaged model folder holds (its config and the weights' header)."""
    config = json.loads((folder / CONFIG).read_text())
    model = config["model"]
    weights = folder / WEIGHTS
    return ModelInfo(
        name=name,
        source=source,
        mode=config.get("mode", "unidirectional" if model.get("causal") else "bidirectional"),
        kernel=KERNEL_NAMES.get(model.get("kernel", ""), model.get("kernel", "?")),
        shape=f"{model['depth']} x {model['dim']}",
        parameters=_parameters(weights),
        megabytes=weights.stat().st_size / 1e6,
        test_perplexity=_test_perplexity(folder, config),
    )


def list_models(runs: Path = RUNS_DIR) -> list[ModelInfo]:
    """The packaged models (by name), then the exports under ``runs`` (newest first)."""
    found = [describe(folder, name, "packaged") for name, folder in packaged_models().items()]
    for export in local_exports(runs):
        run = export.parent if export.name == "export" else export
        found.append(describe(export, str(run), "run"))
    return found


def format_models(found: list[ModelInfo]) -> str:
    """A Markdown table of the models, one row each."""
    rows = [("model", "from", "mode", "kernel", "layers x d", "parameters", "MB", "test ppl")]
    for info in found:
        ppl = "" if info.test_perplexity is None else f"{info.test_perplexity:.2f}"
        rows.append((info.name, info.source, info.mode, info.kernel, info.shape,
                     f"{info.parameters:,}", f"{info.megabytes:.1f}", ppl))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
             for row in rows]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def models(runs: Path = RUNS_DIR) -> list[ModelInfo]:
    """List the models --model accepts: the packaged ones by name, and the exports of the runs
    under ./runs by path, the most recent first (the one used when no --model is given).

    Example: protperf models

    Args:
        runs: the folder of training runs to look in.
    """
    found = list_models(runs)
    if not found:
        print(f"no packaged models and no exports under {runs}/ (train one with protperf train)")
    else:
        print(format_models(found))
    return found


def main(argv: list[str]) -> int:
    """``protperf models``: returns the exit status."""
    return run_verb(models, argv, prog="protperf models")
