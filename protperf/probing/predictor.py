"""The probe's predictor: scikit-learn fits it, numpy applies it, nothing is pickled.

Features are standardised on the training proteins, then fed to logistic regression
(classification; multinomial, lbfgs) or ridge regression, whose regularisation (C or alpha) is
chosen from a fixed grid by k-fold cross-validation (stratified for classes, shuffled with a
seed) on the training proteins only, then refitted on all of them. The fitted pipeline becomes a
:class:`Probe` of plain arrays, saved as ``probe.safetensors`` (standardisation ``mean`` and
``scale`` (F,), ``coef`` (C, F) and ``intercept`` (C,), float64; C = 1 for a regression and for
two classes) and ``probe.json`` (the task, the class names and the settings).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from protperf.errors import InputError

Task = Literal["classification", "regression"]
#: Regularisation grids searched by cross-validation: C of logistic regression, alpha of ridge.
C_GRID = tuple(10.0**power for power in range(-4, 3))
ALPHA_GRID = tuple(10.0**power for power in range(-2, 6))
#: Iterations of the logistic regression's solver (lbfgs) before it stops.
MAX_ITER = 3000
DEFAULT_FOLDS = 5
#: The figure a task's cross-validation optimises: accuracy (higher), RMSE (lower).
CV_METRIC = {"classification": "accuracy", "regression": "rmse"}
#: The files of a probe folder that :func:`save_probe` writes.
WEIGHTS, SETTINGS = "probe.safetensors", "probe.json"
FORMAT, FORMAT_VERSION = "protperf-probe", 1


@dataclass
class Probe:
    """A fitted linear probe, applied with numpy: ``z = (x - mean) / scale``, then
    ``scores = z @ coef.T + intercept``; softmax over classes (a sigmoid for two), or the value.

    ``classes``: the class names in the order of the probabilities (empty for regression).
    ``mean``, ``scale``: (F,); ``coef``: (C, F); ``intercept``: (C,).
    """

    task: Task
    classes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, C) linear scores."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef.T + self.intercept

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, len(classes)) class probabilities (classification)."""
        scores = self.scores(features)
        if len(self.classes) == 2:  # one score: the log-odds of the second class
            scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
        scores = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,): class names, or values for a regression."""
        if self.task == "regression":
            return self.scores(features)[:, 0]
        return np.asarray(self.classes)[self.probabilities(features).argmax(axis=1)]


@dataclass(frozen=True)
class Selection:
    """The regularisation chosen by cross-validation: the parameter's name (C or alpha), the
    value chosen, the grid and each value's mean score over the folds (accuracy, or RMSE)."""

    parameter: str
    value: float
    grid: tuple[float, ...]
    scores: tuple[float, ...]
    metric: str
    folds: int
    seed: int

    @property
    def score(self) -> float:
        return self.scores[self.grid.index(self.value)]


def _search(task: Task, folds: int, seed: int):
    """scikit-learn's grid search of :func:`fit_probe`, not yet fitted."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "classification":
        model, grid = LogisticRegression(max_iter=MAX_ITER), {"model__C": list(C_GRID)}
        splitter, scoring = StratifiedKFold(folds, shuffle=True, random_state=seed), "accuracy"
    else:
        model, grid = Ridge(), {"model__alpha": list(ALPHA_GRID)}
        splitter = KFold(folds, shuffle=True, random_state=seed)
        scoring = "neg_root_mean_squared_error"
    pipeline = Pipeline([("scale", StandardScaler()), ("model", model)])
    return GridSearchCV(pipeline, grid, scoring=scoring, cv=splitter)


def fit_probe(
    features: np.ndarray, labels: Sequence, *, task: Task, folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> tuple[Probe, Selection]:  # fmt: skip
    """Standardise, then fit logistic regression (``labels``: class names) or ridge regression
    (``labels``: numbers) on (N, F) ``features``, with C or alpha chosen from :data:`C_GRID` /
    :data:`ALPHA_GRID` by ``folds``-fold cross-validation on these proteins only (stratified and
    shuffled with ``seed``), then refitted on all of them."""
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=str if task == "classification" else np.float64)
    search = _search(task, folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # MAX_ITER bounds the large-C fits
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        search.fit(x, y)
    ((key, grid),) = search.param_grid.items()
    sign = 1.0 if task == "classification" else -1.0  # scikit-learn maximises -RMSE
    scores = tuple(sign * float(s) for s in search.cv_results_["mean_test_score"])
    chosen = float(search.best_params_[key])
    selection = Selection(key.removeprefix("model__"), chosen, tuple(grid), scores,
                          CV_METRIC[task], folds, seed)  # fmt: skip
    return probe_from_pipeline(search.best_estimator_, task), selection


def probe_from_pipeline(pipeline, task: Task) -> Probe:
    """A :class:`Probe` of a fitted scikit-learn ``StandardScaler`` + linear model pipeline."""
    scaler, model = pipeline.named_steps["scale"], pipeline.named_steps["model"]
    classes = tuple(str(name) for name in model.classes_) if task == "classification" else ()
    return Probe(task, classes, scaler.mean_.astype(np.float64),
                 scaler.scale_.astype(np.float64), np.atleast_2d(model.coef_).astype(np.float64),
                 np.atleast_1d(model.intercept_).astype(np.float64))  # fmt: skip


def save_probe(folder: Path, probe: Probe, settings: dict) -> None:
    """Write ``probe.safetensors`` (the arrays) and ``probe.json`` (``settings`` with the
    task and the classes) into ``folder``."""
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(getattr(probe, name))
              for name in ("mean", "scale", "coef", "intercept")}  # fmt: skip
    save_file(arrays, str(folder / WEIGHTS), metadata={"format": FORMAT})
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": probe.task,
                "classes": list(probe.classes), **settings}  # fmt: skip
    (folder / SETTINGS).write_text(json.dumps(document, indent=2) + "\n")


def load_probe(folder: Path) -> tuple[Probe, dict]:
    """(the probe, its settings) of a folder that ``probe fit`` wrote; an
    :class:`InputError` names what is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / SETTINGS).is_file():
        raise InputError(f"PROBE {folder}: no {SETTINGS} (not a folder that probe fit wrote)")
    try:
        settings = json.loads((folder / SETTINGS).read_text())
        if settings.get("format") != FORMAT:
            raise ValueError(f"format {settings.get('format')!r}, not {FORMAT!r}")
        arrays = load_file(str(folder / WEIGHTS))
        probe = Probe(settings["task"], tuple(settings["classes"]), arrays["mean"],
                      arrays["scale"], arrays["coef"], arrays["intercept"])  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise InputError(f"PROBE {folder}: not a readable probe ({error})") from error
    return probe, settings
