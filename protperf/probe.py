"""`protperf probe`: predictors on frozen embeddings, fitted, checked on held-out proteins, applied.

    protperf probe fit TRAIN.fasta -o PROBE [--test TEST.fasta] [--model MODEL | --embeddings
        E.h5 ...] [--task classification|regression] [--label-field N | --label-regex RE |
        --labels labels.csv] [--layers -1 ...] [--pooling mean ...] [--folds 5]
        [--bootstrap 1000] [--seed 0] [--overwrite]
    protperf probe predict PROBE proteins.fasta [-o predictions.csv] [--model MODEL |
        --embeddings E.h5 ...] [--overwrite]

``fit`` reads labelled proteins (the label in the FASTA header, or a CSV of ``id,label``),
makes their features (:mod:`protperf.probing.features`: pooled states of ``--layers``), fits
the predictor on the training proteins with its regularisation chosen by cross-validation on
them only (:mod:`protperf.probing.predictor`), and scores the test proteins once, next to the
same predictor on amino-acid composition and log length (plus the termini's composition when
the pooling reads the termini) fitted and scored on the same split
(:mod:`protperf.probing.figures`: bootstrap intervals). Every input is checked before the model
is loaded. The probe folder, written whole or not at all, holds ``probe.safetensors`` and
``probe.json`` (nothing pickled) and ``report.md`` / ``report.json``. ``predict`` rebuilds the
predictor with numpy, recomputes the same features and refuses a model or embeddings file
with other weights.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from protperf import __version__
from protperf.commandline import USAGE_ERROR, run_verb
from protperf.durable import check_output_file, check_output_folder
from protperf.embed import DEFAULT_TOKENS_PER_BATCH, default_output
from protperf.errors import InputError
from protperf.fasta import MAX_LISTED, FastaRecord, read_fasta
from protperf.inference import Precision
from protperf.probing.features import (
    TERMINUS_RESIDUES,
    FeatureSpec,
    Pooling,
    RunOptions,
    composition_features,
    compute_features,
)
from protperf.probing.figures import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    DIFFERENCE,
    HEADLINE,
    as_plain,
    evaluate_predictions,
    format_estimate,
)
from protperf.probing.predictor import (
    DEFAULT_FOLDS,
    Probe,
    Selection,
    Task,
    fit_probe,
    load_probe,
    save_probe,
)

#: Training proteins a class needs: one to learn it from in every cross-validation split.
MIN_CLASS_PROTEINS = 2
#: The report files of a probe folder (beside the predictor's).
REPORT_MD, REPORT_JSON = "report.md", "report.json"
#: The two rows of a report: the model's embeddings and the composition baseline.
EMBEDDINGS, COMPOSITION = "embeddings", "composition"


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSource:
    """Where labels come from: a field of the FASTA header (1-based, the id is field 1), a
    regular expression searched in the header (its first group, else the whole match), or a
    CSV file of ``id,label``. Exactly one is set."""

    field: int | None = None
    regex: str | None = None
    table: Path | None = None

    def describe(self) -> str:
        if self.field is not None:
            return f"--label-field {self.field}"
        if self.regex is not None:
            return f"--label-regex '{self.regex}'"
        return f"--labels {self.table}"


def check_label_source(source: LabelSource) -> None:
    """Raise :class:`InputError` unless exactly one valid way to read labels is given."""
    given = [value for value in (source.field, source.regex, source.table) if value is not None]
    if len(given) != 1:
        raise InputError(
            "give the labels one way: --label-field N (a field of the FASTA header), "
            "--label-regex RE or --labels labels.csv (columns id,label)"
        )
    if source.field is not None and source.field < 2:
        raise InputError(f"--label-field {source.field}: field 1 is the id; labels start at 2")
    if source.regex is not None:
        try:
            re.compile(source.regex)
        except re.error as error:
            raise InputError(
                f"--label-regex {source.regex!r}: not a regular expression ({error})"
            ) from None


def read_label_table(path: Path) -> dict[str, str]:
    """{id: label} of a CSV file with the columns ``id`` and ``label``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--labels {path}: no such file")
    table: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"id", "label"} <= set(reader.fieldnames or ()):
                found = ", ".join(repr(name) for name in reader.fieldnames or ()) or "nothing"
                raise InputError(
                    f"{path}, line 1: needs the columns 'id' and 'label' (the header has {found})"
                )
            for row in reader:
                protein, label = (row["id"] or "").strip(), (row["label"] or "").strip()
                if not protein:
                    continue
                if protein in table:
                    raise InputError(f"{path}, line {reader.line_num}: id {protein!r} again")
                table[protein] = label
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a text file ({error.reason})") from error
    except csv.Error as error:
        raise InputError(f"{path}: not a readable CSV file ({error})") from error
    return table


def record_label(record: FastaRecord, source: LabelSource, table: dict[str, str] | None) -> str:
    """The label of one record, or "" where the source has none for it."""
    if source.field is not None:
        fields = record.description.split()
        return fields[source.field - 1] if len(fields) >= source.field else ""
    if source.regex is not None:
        match = re.search(source.regex, record.description)
        if match is None:
            return ""
        return match.group(1) if match.re.groups else match.group(0)
    return (table or {}).get(record.id, "")


def read_labelled(
    fasta: Path, source: LabelSource, table: dict[str, str] | None, task: Task
) -> tuple[list[FastaRecord], list[str]]:
    """The records of ``fasta`` and their labels (text); a record without a label, or one that is
    not a number for a regression, is an :class:`InputError` naming the file and the record."""
    records, _ = read_fasta(fasta)
    labels = []
    for number, record in enumerate(records, start=1):
        label = record_label(record, source, table).strip()
        where = f"{fasta}: record {number} ({record.id!r})"
        if not label:
            raise InputError(f"{where}: no label ({_no_label_reason(source)})")
        if task == "regression" and not np.isfinite(_number(label)):
            raise InputError(f"{where}: label {label!r} is not a number (--task regression)")
        labels.append(label)
    return records, labels


def _no_label_reason(source: LabelSource) -> str:
    if source.field is not None:
        return f"the header has no field {source.field}"
    if source.regex is not None:
        return f"the header does not match --label-regex '{source.regex}'"
    return f"its id is not in {source.table}"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def check_classes(
    train: Path, train_labels: Sequence[str], test: Path | None,
    test_records: Sequence[FastaRecord], test_labels: Sequence[str],
) -> None:  # fmt: skip
    """A classification needs two classes or more, each with :data:`MIN_CLASS_PROTEINS`
    training proteins, and no test label the training proteins lack."""
    classes, counts = np.unique(np.asarray(train_labels), return_counts=True)
    if len(classes) < 2:
        raise InputError(
            f"{train}: every protein has the label {str(classes[0])!r}; a classifier needs two "
            "classes or more"
        )
    if counts.min() < MIN_CLASS_PROTEINS:
        rare = str(classes[counts.argmin()])
        raise InputError(
            f"{train}: label {rare!r} has {counts.min()} protein; cross-validation needs "
            f"{MIN_CLASS_PROTEINS} or more of each class"
        )
    known = set(classes.tolist())
    for number, (record, label) in enumerate(zip(test_records, test_labels, strict=True), 1):
        if label not in known:
            shown = ", ".join(sorted(known)[:MAX_LISTED]) + (
                ", ..." if len(known) > MAX_LISTED else ""
            )
            raise InputError(
                f"{test}: record {number} ({record.id!r}): label {label!r} is not among the "
                f"training labels ({shown})"
            )


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def report_markdown(report: dict) -> str:
    """The Markdown report of a fit (the JSON report's ``report`` dict)."""
    task, cv = report["task"], report["cross_validation"]
    classes = report.get("classes", [])
    lines = [
        f"# probe: {task}" + (f", {len(classes)} classes" if classes else ""),
        "",
        f"Fitted on {report['train']['proteins']:,} proteins of {report['train']['fasta']}"
        + (f", scored on {report['test']['proteins']:,} of {report['test']['fasta']}"
           if report.get("test") else "")
        + f"; labels: {report['labels']}.",
        f"Features: {report['features']['description']} ({report['features']['size']:,} "
        "values a protein, standardised on the training proteins).",
        f"{report['estimator'].capitalize()}, {cv['parameter']} = {cv['value']:g} chosen by "
        f"{cv['folds']}-fold cross-validation on the training proteins ({cv['metric']} "
        f"{cv['score']:.3f}; composition: {cv['parameter']} = "
        f"{report['composition_cv']['value']:g}).",
    ]  # fmt: skip
    figures = report.get("figures")
    if not figures:
        return "\n".join(lines) + "\n"
    first, second = HEADLINE[task]
    percent = {"accuracy": True, "mcc": False, "spearman": False, "rmse": False}
    names = {"accuracy": "accuracy (%)", "mcc": "MCC", "spearman": "Spearman", "rmse": "RMSE"}
    lines += [
        f"95% intervals: {report['bootstrap']['resamples']:,} bootstrap resamples of the test "
        f"proteins (seed {report['bootstrap']['seed']}).",
        "",
        f"| features | {names[first]} | {names[second]} |",
        "|---|---:|---:|",
    ]
    labels = {EMBEDDINGS: report["features"]["description"],
              COMPOSITION: report["composition_features"],
              DIFFERENCE: "difference (embeddings - composition)"}  # fmt: skip
    for row in (EMBEDDINGS, COMPOSITION, DIFFERENCE):
        cells = [format_estimate(figures[row][figure], percent[figure], signed=row == DIFFERENCE)
                 for figure in (first, second)]  # fmt: skip
        lines.append(f"| {labels[row]} | {cells[0]} | {cells[1]} |")
    if task == "classification":
        lines += ["", "Recall per class (%):", "",
                  "| class | test proteins | embeddings | composition |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for i, name in enumerate(classes):
            count = report["test"]["per_class"][name]
            cells = [
                format_estimate(figures[row]["recall"][i], True)
                for row in (EMBEDDINGS, COMPOSITION)
            ]
            lines.append(f"| {name} | {count:,} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The verbs
# ---------------------------------------------------------------------------------------------


def _check_common(layers: Sequence[int], pooling: Sequence[str], model: str | None,
                  embeddings: Sequence[Path], run: RunOptions) -> None:  # fmt: skip
    if model is not None and embeddings:
        raise InputError("give --model or --embeddings, not both")
    if not pooling or len(set(pooling)) != len(pooling):
        raise InputError(f"--pooling {' '.join(pooling)}: give each pooling once")
    if not layers:
        raise InputError("--layers needs at least one layer")
    if run.tokens_per_batch <= 0:
        raise InputError(f"--tokens-per-batch must be positive, got {run.tokens_per_batch}")


def _check_fit_settings(out: Path, folds: int, bootstrap: int, *, overwrite: bool) -> None:
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    if bootstrap < 1:
        raise InputError(f"--bootstrap must be at least 1, got {bootstrap}")
    if out.exists() and not overwrite:
        raise InputError(f"-o {out}: the folder exists; pass --overwrite to replace it")
    check_output_folder(out, option="-o")


@dataclass(frozen=True)
class Labelled:
    """The proteins of one FASTA file and their labels (text)."""

    fasta: Path
    records: list[FastaRecord]
    labels: list[str]

    def targets(self, task: Task) -> np.ndarray:
        """(N,) the labels as a predictor takes them: class names, or numbers."""
        return np.asarray(self.labels, dtype=str if task == "classification" else np.float64)


def read_split(
    train: Path, test: Path | None, source: LabelSource, task: Task, *, folds: int
) -> tuple[Labelled, Labelled | None]:
    """The training and test proteins with their labels, checked: enough proteins for the
    folds, no protein in both, and for a classification :func:`check_classes`."""
    table = None if source.table is None else read_label_table(source.table)
    train_set = Labelled(train, *read_labelled(train, source, table, task))
    test_set = None if test is None else Labelled(test, *read_labelled(test, source, table, task))
    if len(train_set.records) < folds:
        raise InputError(
            f"{train}: {len(train_set.records)} protein(s); {folds}-fold cross-validation needs "
            f"{folds} or more"
        )
    if test_set is not None:
        shared = {r.id for r in train_set.records} & {r.id for r in test_set.records}
        if shared:
            raise InputError(f"{test}: protein {sorted(shared)[0]!r} is in {train} too; a test "
                             "protein must be held out from training")  # fmt: skip
    if task == "classification":
        check_classes(train, train_set.labels, test,
                      [] if test_set is None else test_set.records,
                      [] if test_set is None else test_set.labels)  # fmt: skip
    return train_set, test_set


def fit_and_report(
    task: Task, features: np.ndarray, composition: np.ndarray, train: Labelled,
    test: Labelled | None, *, spec: FeatureSpec, source: LabelSource, folds: int, seed: int,
    resamples: int,
) -> tuple[Probe, dict]:  # fmt: skip
    """Fit the probe on the model's features and the baseline on composition features (rows:
    the training proteins, then the test proteins; (N, F) and (N, F')), and score both on the
    test proteins. Returns (the probe, the JSON report)."""
    n = len(train.records)
    y = train.targets(task)
    probe, selection = fit_probe(features[:n], y, task=task, folds=folds, seed=seed)
    baseline, baseline_selection = fit_probe(composition[:n], y, task=task, folds=folds, seed=seed)
    report = _report(task, probe, selection, baseline_selection, spec, source, train, test)
    if test is not None:
        predictions = {EMBEDDINGS: probe.predict(features[n:]),
                       COMPOSITION: baseline.predict(composition[n:])}  # fmt: skip
        figures = evaluate_predictions(task, test.targets(task), predictions,
                                       classes=probe.classes, resamples=resamples,
                                       seed=seed)  # fmt: skip
        report["bootstrap"] = {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE}
        report["figures"] = as_plain(figures)
    return probe, report


def fit(
    train: Path,
    out: Path,
    test: Path | None = None,
    model: str | None = None,
    embeddings: tuple[Path, ...] = (),
    task: Task = "classification",
    label_field: int | None = None,
    label_regex: str | None = None,
    labels: Path | None = None,
    layers: tuple[int, ...] = (-1,),
    pooling: tuple[Pooling, ...] = ("mean",),
    folds: int = DEFAULT_FOLDS,
    bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: str = "cpu",
    precision: Precision = "32",
    overwrite: bool = False,
) -> Path:
    """Fit a predictor on frozen embeddings of labelled proteins, test it, and save it.

    Logistic regression (classification) or ridge regression on standardised features, the
    regularisation chosen by cross-validation on the training proteins only. With --test, the
    report (report.md, report.json; the Markdown also on standard output) gives accuracy,
    Matthews correlation and recall per class, or Spearman and RMSE, with bootstrap 95%
    intervals, next to the same predictor on amino-acid composition + length fitted and scored
    on the same proteins. OUT gets probe.safetensors and probe.json (no pickle), which probe
    predict applies; it appears only when complete.
    Example: protperf probe fit train.fasta --test test.fasta --label-field 2 -o my-probe

    Args:
        train: FASTA file of the training proteins (plain or gzipped).
        out: the probe folder to write.
        test: FASTA file of the test proteins, scored once.
        model: a packaged model's name, a run folder, an export folder or a Lightning .ckpt
            (default: the most recent export under ./runs, else the packaged model).
        embeddings: HDF5 files of protperf embed holding every protein, found by id, instead of
            --model (mean pooling; the others need --per-residue files).
        task: classification (logistic regression) or regression (ridge; numeric labels).
        label_field: the label is this field of the FASTA header (split at white space; field
            1 is the id).
        label_regex: the label is the first group (else the match) of this regular expression,
            searched in the FASTA header (the line after '>').
        labels: CSV file with the columns id and label, for proteins of both files.
        layers: layers whose pooled states are concatenated: 0 = token embedding, i = block i,
            -1 = final (layer-normed).
        pooling: concatenated for each layer: mean, max or std over the residues; the bos or
            eos state; n-term or c-term, the mean over the first or last 32 residues.
        folds: cross-validation folds on the training proteins.
        bootstrap: resamples of the test proteins for the 95% intervals.
        seed: seed of the folds and of the resamples.
        tokens_per_batch: token budget of a batch (count x longest, with <bos>/<eos>).
        device: cpu, cuda or cuda:N.
        precision: 32 (float32) or bf16-mixed / 16-mixed autocast; features are float32.
        overwrite: replace an existing OUT folder.
    """
    started = time.perf_counter()
    train, out = Path(train), Path(out)
    test = None if test is None else Path(test)
    source = LabelSource(label_field, label_regex, None if labels is None else Path(labels))
    run = RunOptions(tokens_per_batch, device, precision)
    check_label_source(source)
    _check_common(layers, pooling, model, embeddings, run)
    _check_fit_settings(out, folds, bootstrap, overwrite=overwrite)
    train_set, test_set = read_split(train, test, source, task, folds=folds)
    records = train_set.records + ([] if test_set is None else test_set.records)
    features, spec = compute_features(records, model=model, embeddings=embeddings,
                                      layers=layers, pooling=pooling, run=run)  # fmt: skip
    composition = composition_features([r.sequence for r in records], pooling)
    probe, report = fit_and_report(task, features, composition, train_set, test_set, spec=spec,
                                   source=source, folds=folds, seed=seed,
                                   resamples=bootstrap)  # fmt: skip
    settings = {"features": {**asdict(spec), "terminus_residues": TERMINUS_RESIDUES},
                "selection": report["cross_validation"], "labels": source.describe(),
                "train": report["train"], "protperf_version": __version__,
                "scikit_learn_version": _sklearn_version()}  # fmt: skip
    _write_probe_folder(out, probe, settings, report, overwrite=overwrite)
    print(report_markdown(report), end="")
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return out


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def _report(task: Task, probe: Probe, selection: Selection, baseline: Selection,
            spec: FeatureSpec, source: LabelSource, train: Labelled,
            test: Labelled | None) -> dict:  # fmt: skip
    """The JSON report of a fit, without the test figures."""
    termini = [part for part in ("n-term", "c-term") if part in spec.pooling]
    composition = "amino-acid composition + log length" + (
        f" + {' and '.join(termini)} composition" if termini else ""
    )
    report = {
        "task": task,
        "estimator": "logistic regression" if task == "classification" else "ridge regression",
        "labels": source.describe(),
        "train": {"fasta": str(train.fasta), "proteins": len(train.records)},
        "features": {"description": spec.describe(), "size": spec.size, **asdict(spec)},
        "composition_features": composition,
        "cross_validation": {**asdict(selection), "score": selection.score},
        "composition_cv": {**asdict(baseline), "score": baseline.score},
        "bootstrap": None,
    }
    if task == "classification":
        report["classes"] = list(probe.classes)
    if test is not None:
        report["test"] = {"fasta": str(test.fasta), "proteins": len(test.records)}
        if task == "classification":
            report["test"]["per_class"] = {name: test.labels.count(name) for name in probe.classes}
    return report


def _write_probe_folder(out: Path, probe: Probe, settings: dict, report: dict, *,
                        overwrite: bool) -> None:  # fmt: skip
    """The four files, written beside ``out`` and renamed into place whole."""
    import shutil

    from protperf.export import publish, staging_folder

    staging = staging_folder(out)
    try:
        save_probe(staging, probe, settings)
        (staging / REPORT_JSON).write_text(json.dumps(as_plain(report), indent=2) + "\n")
        (staging / REPORT_MD).write_text(report_markdown(report))
        if out.exists() and not overwrite:  # appeared while this run worked
            raise InputError(f"-o {out}: the folder exists; pass --overwrite to replace it")
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_predictions(fasta: Path) -> Path:
    """``<fasta stem>.predictions.csv`` beside the FASTA file."""
    return fasta.parent / f"{default_output(fasta).stem}.predictions.csv"


def predict(
    probe: Path,
    fasta: Path,
    out: Path | None = None,
    model: str | None = None,
    embeddings: tuple[Path, ...] = (),
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: str = "cpu",
    precision: Precision = "32",
    overwrite: bool = False,
) -> Path:
    """Apply a fitted probe to proteins: one CSV row each, with the class probabilities.

    The features are made as for the fit: the same layers and pooling, from the model the probe
    was fitted with (or --model, or --embeddings files), whose weights must be the same. Rows:
    id, prediction, then p_<class> for each class (classification), in FASTA order.
    Example: protperf probe predict my-probe proteins.fasta -o predictions.csv

    Args:
        probe: a folder that protperf probe fit wrote.
        fasta: FASTA file of the proteins (plain or gzipped).
        out: output CSV (default: beside the FASTA file, <name>.predictions.csv).
        model: the model to compute the features with (default: the one the probe records).
        embeddings: HDF5 files of protperf embed holding every protein, made with the probe's
            model and layers, instead of a model.
        tokens_per_batch: token budget of a batch (count x longest, with <bos>/<eos>).
        device: cpu, cuda or cuda:N.
        precision: 32 (float32) or bf16-mixed / 16-mixed autocast.
        overwrite: replace an existing output file.
    """
    from protperf.score import write_table

    fasta = Path(fasta)
    out = Path(out) if out is not None else default_predictions(fasta)
    fitted, settings = load_probe(Path(probe))
    spec = FeatureSpec.from_dict(settings["features"])
    if fitted.coef.shape[1] != spec.size:
        raise InputError(f"PROBE {probe}: its coefficients ({fitted.coef.shape[1]} features) do "
                         f"not match its features ({spec.describe()}: {spec.size})")  # fmt: skip
    run = RunOptions(tokens_per_batch, device, precision)
    _check_common(spec.layers, spec.pooling, model, embeddings, run)
    check_output_file(out, overwrite=overwrite)
    records, _ = read_fasta(fasta)
    x, _ = compute_features(
        records, model=model or (None if embeddings else spec.model), embeddings=embeddings,
        layers=spec.layers, pooling=spec.pooling, run=run, expected=spec,
    )  # fmt: skip
    predicted = fitted.predict(x)
    if fitted.task == "classification":
        header = ["id", "prediction", *(f"p_{name}" for name in fitted.classes)]
        probabilities = fitted.probabilities(x)
        rows = [[r.id, label, *map(float, p)]
                for r, label, p in zip(records, predicted, probabilities, strict=True)]  # fmt: skip
    else:
        header = ["id", "prediction"]
        rows = [[r.id, float(value)] for r, value in zip(records, predicted, strict=True)]
    write_table(out, header, rows, overwrite=overwrite)
    print(f"predicted {len(records):,} proteins with {spec.describe()}", file=sys.stderr)
    print(out)
    return out


#: subcommand -> (function, positional parameters, one-line summary).
SUBCOMMANDS = {
    "fit": (fit, ("train",), "fit a predictor on frozen embeddings and test it (a probe folder)"),
    "predict": (predict, ("probe", "fasta"), "apply a fitted probe to proteins (CSV)"),
}


def _usage() -> str:
    lines = ["usage: protperf probe {fit,predict} ...", "",
             "Predictors on frozen embeddings: fit one on labelled proteins, then apply it.",
             ""]  # fmt: skip
    lines += [f"  {name:<8} {summary}" for name, (_, _, summary) in SUBCOMMANDS.items()]
    lines += ["", "protperf probe fit --help and protperf probe predict --help list the options."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``protperf probe fit|predict``: parse ``argv`` and run; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else USAGE_ERROR
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"protperf probe: error: unknown subcommand {name!r}: use fit or predict (see "
              "protperf probe --help)", file=sys.stderr)  # fmt: skip
        return USAGE_ERROR
    function, positional, _ = SUBCOMMANDS[name]
    return run_verb(function, rest, prog=f"protperf probe {name}", positional=positional,
                    short={"out": "-o"}, threads=True)  # fmt: skip
