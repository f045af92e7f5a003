"""Test figures with bootstrap intervals, for many resamples at once.

Each figure is computed on the whole test set and on ``resamples`` resamples of the test
proteins drawn with replacement (a fixed seed); the interval is the percentile interval
(:data:`CONFIDENCE`). Several rows of predictions share the resamples, so the difference between
two has an interval of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from protperf.probing.predictor import Task

DEFAULT_RESAMPLES = 1000
#: Resamples scored at a time (memory: resamples x test proteins indices).
RESAMPLE_BLOCK = 100
#: The interval's coverage.
CONFIDENCE = 0.95
#: The two figures a task reports first, whose difference between two rows gets an interval.
HEADLINE = {"classification": ("accuracy", "mcc"), "regression": ("spearman", "rmse")}
#: The key of that difference among the rows.
DIFFERENCE = "difference"


@dataclass(frozen=True)
class Estimate:
    """A figure on the test proteins and its bootstrap interval."""

    value: float
    low: float
    high: float


def confusion_scores(
    truth: np.ndarray, predicted: np.ndarray, classes: int
) -> dict[str, np.ndarray]:
    """Accuracy, Matthews correlation (Gorodkin's multiclass form, 0 where undefined, as
    scikit-learn) and recall per class of R resamples at once.

    truth, predicted: (R, n) class indices -> {"accuracy": (R,), "mcc": (R,),
    "recall": (R, classes), NaN for a class absent from a resample}.
    """
    rows = np.arange(truth.shape[0])[:, None]
    flat = (rows * classes + truth) * classes + predicted
    counts = np.bincount(flat.ravel(), minlength=truth.shape[0] * classes * classes)
    confusion = counts.reshape(truth.shape[0], classes, classes).astype(np.float64)
    total = confusion.sum(axis=(1, 2))
    correct = np.trace(confusion, axis1=1, axis2=2)
    actual, guessed = confusion.sum(axis=2), confusion.sum(axis=1)
    numerator = correct * total - (actual * guessed).sum(axis=1)
    denominator = np.sqrt(
        (total**2 - (guessed**2).sum(axis=1)) * (total**2 - (actual**2).sum(axis=1))
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        mcc = np.where(denominator > 0, numerator / denominator, 0.0)
        recall = np.diagonal(confusion, axis1=1, axis2=2) / actual
    return {"accuracy": correct / total, "mcc": mcc, "recall": recall}


def regression_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """Spearman correlation and RMSE of R resamples at once: (R, n) values -> {name: (R,)}."""
    from scipy.stats import rankdata

    ranks = [rankdata(values, axis=1) for values in (truth, predicted)]
    centred = [r - r.mean(axis=1, keepdims=True) for r in ranks]
    with np.errstate(divide="ignore", invalid="ignore"):
        spearman = (centred[0] * centred[1]).sum(axis=1) / np.sqrt(
            (centred[0] ** 2).sum(axis=1) * (centred[1] ** 2).sum(axis=1)
        )
    rmse = np.sqrt(((truth - predicted) ** 2).mean(axis=1))
    return {"spearman": spearman, "rmse": rmse}


def bootstrap_estimates(
    score: Callable[[np.ndarray], dict[str, np.ndarray]], size: int, *,
    resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, list[Estimate] | Estimate]:  # fmt: skip
    """Each figure of ``score`` on the whole test set with its percentile interval
    (:data:`CONFIDENCE`) over ``resamples`` resamples of the ``size`` test proteins drawn with
    replacement (``seed``). ``score``: (R, n) indices -> {name: (R,) or (R, k)}; a (R, k)
    figure gives k estimates."""
    rng = np.random.default_rng(seed)
    point = score(np.arange(size)[None])
    draws: dict[str, list[np.ndarray]] = {name: [] for name in point}
    for start in range(0, resamples, RESAMPLE_BLOCK):
        block = rng.integers(0, size, (min(RESAMPLE_BLOCK, resamples - start), size))
        for name, values in score(block).items():
            draws[name].append(values)
    tail = 100 * (1 - CONFIDENCE) / 2
    estimates: dict[str, list[Estimate] | Estimate] = {}
    for name, values in point.items():
        samples = np.concatenate(draws[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every resample
            low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
        found = [Estimate(float(v), float(lo), float(hi))
                 for v, lo, hi in zip(np.atleast_1d(values[0]), np.atleast_1d(low),
                                      np.atleast_1d(high), strict=True)]  # fmt: skip
        estimates[name] = found if np.ndim(values[0]) else found[0]
    return estimates


def evaluate_predictions(
    task: Task, truth: np.ndarray, predictions: dict[str, np.ndarray], *, classes: Sequence[str],
    resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, dict]:  # fmt: skip
    """The test figures of each row of ``predictions`` and the difference of the first row's
    headline figures minus the second's, on the same resamples. ``truth`` and each prediction:
    (n,) class names or values.

    Returns {row: {figure: Estimate, "recall": [Estimate per class]}, "difference": {...}}.
    """
    names = list(predictions)
    if task == "classification":
        index = {name: i for i, name in enumerate(classes)}
        coded = [
            np.array([index[label] for label in values])
            for values in (truth, *predictions.values())
        ]

        def figures(rows: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
            return confusion_scores(coded[0][rows], values[rows], len(classes))

        columns = coded[1:]
    else:
        coded = [np.asarray(truth, dtype=np.float64)]

        def figures(rows: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
            return regression_scores(coded[0][rows], values[rows])

        columns = [np.asarray(values, dtype=np.float64) for values in predictions.values()]

    def score(rows: np.ndarray) -> dict[str, np.ndarray]:
        found = {}
        per_row = [figures(rows, values) for values in columns]
        for name, row in zip(names, per_row, strict=True):
            found.update({f"{name}/{figure}": value for figure, value in row.items()})
        for figure in HEADLINE[task]:
            found[f"{DIFFERENCE}/{figure}"] = per_row[0][figure] - per_row[1][figure]
        return found

    estimates = bootstrap_estimates(score, len(truth), resamples=resamples, seed=seed)
    out: dict[str, dict] = {}
    for key, estimate in estimates.items():
        row, _, figure = key.partition("/")
        out.setdefault(row, {})[figure] = estimate
    return out


def as_plain(value):
    """``value`` ready for JSON: each :class:`Estimate` as {value, low, high} (NaN, the recall
    of a class with no test protein, as null), tuples as lists."""
    if isinstance(value, Estimate):
        return {key: item if np.isfinite(item) else None for key, item in asdict(value).items()}
    if isinstance(value, dict):
        return {key: as_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(item) for item in value]
    return value


def format_estimate(estimate: Estimate | dict, percent: bool, signed: bool = False) -> str:
    """``value [low, high]``, as a percentage with one decimal or with three decimals; "n/a"
    for a figure without a value (the recall of a class with no test protein)."""
    e = estimate if isinstance(estimate, Estimate) else Estimate(**estimate)
    if e.value is None or not np.isfinite(e.value):
        return "n/a"
    scale, digits = (100, 1) if percent else (1, 3)
    sign = "+" if signed else ""
    return (f"{e.value * scale:{sign}.{digits}f} "
            f"[{e.low * scale:{sign}.{digits}f}, {e.high * scale:{sign}.{digits}f}]")  # fmt: skip
