"""Training curves of a run: accuracy and perplexity against steps, as in the paper's figures.

    protperf plot RUN_DIR [--out FILE]

Reads every ``metrics.csv`` under RUN_DIR (``logs/version_N``, one per launch; a resumed launch
overrides the steps it repeats) and draws train dashed, validation solid (test and ood, when
present, as single points at their step; the train curves are also shown smoothed by a moving
average of 10 logged points). Writes RUN_DIR/curves.png unless ``--out`` is given.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from protperf.commandline import run_verb

SERIES = {"train": "--", "valid": "-"}
POINTS = {"test": ("o", "tab:green"), "ood": ("s", "tab:red")}
METRICS = ("accuracy", "perplexity")
SMOOTHING = 10  # logged points in the moving average of the train curves


def moving_average(values: list[float] | tuple[float, ...], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (same length as ``values``)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _version(path: Path) -> tuple[int, str]:
    match = re.search(r"version_(\d+)", str(path))
    return (int(match.group(1)) if match else -1, str(path))


def read_metrics(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """``{"valid/perplexity": {step: value}, ...}`` merged over the run's metrics.csv files."""
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=_version)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    series: dict[str, dict[int, float]] = {}
    for file in files:
        with open(file, newline="") as handle:
            for row in csv.DictReader(handle):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key == "step" or not value:
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        continue
                    if math.isfinite(number):
                        series.setdefault(key, {})[step] = number
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw accuracy and perplexity vs step; returns the PNG's path (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    series = read_metrics(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for (split, style), color in zip(SERIES.items(), ("tab:blue", "tab:orange"), strict=True):
            points = sorted(series.get(f"{split}/{metric}", {}).items())
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            marker = "." if len(points) < 3 else None
            if split == "train" and len(points) > 2 * SMOOTHING:
                # Per-step training values are noisy: faint raw curve, moving average on top.
                ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
                values = moving_average(values, SMOOTHING)
            ax.plot(steps, values, style, color=color, label=split, marker=marker)
        for split, (marker, color) in POINTS.items():
            for step, value in sorted(series.get(f"{split}/{metric}", {}).items()):
                ax.plot([step], [value], marker, color=color, label=f"{split} ({value:.3g})")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(f"{run_dir.name}: train dashed, validation solid")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(run_dir: Path, out: Path | None = None) -> Path:
    """Draw a run's accuracy and perplexity against steps (train dashed, validation solid).

    Reads every metrics.csv under the run folder (one per launch; a resumed launch overrides
    the steps it repeats) and writes a PNG. Example: protperf plot runs/tiny-cpu-uni

    Args:
        run_dir: a `protperf train` run folder.
        out: the PNG to write (default: RUN_DIR/curves.png).
    """
    written = plot_run(run_dir, out)
    print(written)
    return written


def main(argv: list[str]) -> int:
    """``protperf plot``: parse ``argv`` and draw; returns the exit status."""
    return run_verb(plot, argv, prog="protperf plot", positional=("run_dir",))
