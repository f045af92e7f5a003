"""`protperf probe` on real DeepLoc proteins (../shared/data/deeploc): the labels, the numpy
predictor against scikit-learn's, the bootstrap figures against scikit-learn and scipy, the
cross-validation's independence from test labels, and fit -> report -> save -> predict end to end
with tiny models (from a model and from embeddings files)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_models import export_random_model

from protperf import cli
from protperf.fasta import FastaRecord, read_fasta
from protperf.probe import (
    Labelled,
    LabelSource,
    fit_and_report,
    read_label_table,
    read_labelled,
    read_split,
)
from protperf.probing.features import (
    FeatureSpec,
    RunOptions,
    composition_features,
    compute_features,
    file_features,
    model_features,
    open_embedding_file,
)
from protperf.probing.figures import (
    confusion_scores,
    evaluate_predictions,
    regression_scores,
)
from protperf.probing.predictor import MAX_ITER, fit_probe, load_probe
from protperf.tokenizer import encode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from deeploc import DEEPLOC_LABEL_REGEX

#: The subsets the verb runs on: a few short proteins of each class, so that a tiny model embeds
#: them in seconds.
TRAIN_PER_CLASS, TEST_PER_CLASS, MAX_RESIDUES = 6, 8, 300
#: A composition-derived regression target: the fraction of these (hydrophobic) residues.
HYDROPHOBIC = "AILMFVW"
#: What the full DeepLoc composition baseline must beat: the share of the commonest test class.
MARGIN_OVER_CHANCE = 0.1


@pytest.fixture(scope="module")
def deeploc(deeploc_dir: Path) -> tuple[Labelled, Labelled]:
    """DeepLoc's training subset and test set, labels read as the benchmark reads them."""
    source = LabelSource(regex=DEEPLOC_LABEL_REGEX)
    train, test = (
        deeploc_dir / name for name in ("deeploc-train-subset.fasta", "deeploc-test.fasta")
    )
    return read_split(train, test, source, "classification", folds=5)


@pytest.fixture(scope="module")
def composition_run(deeploc):
    """The composition baseline fitted on the whole training subset: (probe, selection, test
    features, test predictions)."""
    train, test = deeploc
    x_train = composition_features([r.sequence for r in train.records])
    x_test = composition_features([r.sequence for r in test.records])
    probe, selection = fit_probe(x_train, train.labels, task="classification")
    return probe, selection, x_test, probe.predict(x_test)


def _subset(labelled: Labelled, per_class: int) -> list[FastaRecord]:
    """The first ``per_class`` proteins of each class with at most MAX_RESIDUES residues."""
    taken: dict[str, int] = {}
    picked = []
    for record, label in zip(labelled.records, labelled.labels, strict=True):
        if len(record.sequence) <= MAX_RESIDUES and taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            picked.append(record)
    return picked


def _write(path: Path, records: list[FastaRecord]) -> Path:
    path.write_text("".join(f">{r.description}\n{r.sequence}\n" for r in records))
    return path


@pytest.fixture(scope="module")
def small_split(tmp_path_factory, deeploc) -> tuple[Path, Path]:
    """train.fasta and test.fasta: a few short DeepLoc proteins of each class, real headers."""
    folder = tmp_path_factory.mktemp("deeploc-small")
    train, test = deeploc
    return (_write(folder / "train.fasta", _subset(train, TRAIN_PER_CLASS)),
            _write(folder / "test.fasta", _subset(test, TEST_PER_CLASS)))  # fmt: skip


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two untrained tiny masked models with different weights (exports)."""
    folder = tmp_path_factory.mktemp("probe-models")
    return export_random_model(folder / "a", seed=0), export_random_model(folder / "b", seed=1)


def _run(*argv) -> int:
    return cli.main([str(arg) for arg in argv])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _within(estimate: dict) -> bool:
    return estimate["low"] <= estimate["value"] <= estimate["high"]


def test_deeploc_labels_are_the_ten_compartments(deeploc):
    """The compartment of field 2; Cytoplasm-Nucleus-U (23 training proteins) counts as
    Cytoplasm (276 Cytoplasm-S); the test set has the same ten classes."""
    train, test = deeploc
    assert len(train.records) == 1678 and len(test.records) == 2768
    classes = sorted(set(train.labels))
    assert len(classes) == 10 and sorted(set(test.labels)) == classes
    assert train.labels.count("Cytoplasm") == 276 + 23
    assert "Cell.membrane" in classes and "Lysosome/Vacuole" in classes


def test_labels_from_a_field_and_from_a_csv_file_agree(small_split, tmp_path):
    """Field 2 is the compartment with its -M/-S/-U; a CSV of the compartments gives what the
    regular expression reads from the headers."""
    train, _ = small_split
    records, by_field = read_labelled(train, LabelSource(field=2), None, "classification")
    compartments = [label.split("-")[0] for label in by_field]
    table = tmp_path / "labels.csv"
    rows = zip(records, compartments, strict=True)
    table.write_text("id,label\n" + "".join(f"{r.id},{c}\n" for r, c in rows))
    source = LabelSource(table=table)
    _, by_table = read_labelled(train, source, read_label_table(table), "classification")
    _, by_regex = read_labelled(
        train, LabelSource(regex=DEEPLOC_LABEL_REGEX), None, "classification"
    )
    assert all(label[-2:] in ("-M", "-S", "-U") for label in by_field)
    assert by_table == by_regex == compartments


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
def test_numpy_probe_matches_scikit_learn(task, deeploc):
    """The probe rebuilt from plain arrays gives scikit-learn's probabilities and values."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = deeploc
    x = composition_features([r.sequence for r in train.records[::2]])  # half: faster
    x_test = composition_features([r.sequence for r in test.records])
    y = np.asarray(train.labels[::2])
    if task == "binary":
        y = np.where(y == "Nucleus", "Nucleus", "elsewhere")
    if task == "regression":  # the square root of the length from the composition alone
        y = np.sqrt([len(r.sequence) for r in train.records[::2]])
        x, x_test = x[:, :-1], x_test[:, :-1]
        probe, selection = fit_probe(x, y, task="regression")
        reference = make_pipeline(StandardScaler(), Ridge(alpha=selection.value)).fit(x, y)
        np.testing.assert_allclose(probe.predict(x_test), reference.predict(x_test), atol=1e-9)
        return
    probe, selection = fit_probe(x, y, task="classification")
    reference = make_pipeline(
        StandardScaler(), LogisticRegression(C=selection.value, max_iter=MAX_ITER)
    )
    reference.fit(x, y)
    assert list(probe.classes) == list(reference.classes_)
    np.testing.assert_allclose(probe.probabilities(x_test), reference.predict_proba(x_test),
                               atol=1e-9)  # fmt: skip
    assert (probe.predict(x_test) == reference.predict(x_test)).all()


def test_confusion_and_regression_scores_match_scikit_learn_and_scipy(deeploc, composition_run):
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, matthews_corrcoef, recall_score

    probe, _, _, predicted = composition_run
    _, test = deeploc
    index = {name: i for i, name in enumerate(probe.classes)}
    truth = np.array([index[label] for label in test.labels])
    guess = np.array([index[label] for label in predicted])
    scores = confusion_scores(truth[None], guess[None], len(probe.classes))
    assert scores["accuracy"][0] == pytest.approx(accuracy_score(truth, guess), abs=1e-12)
    assert scores["mcc"][0] == pytest.approx(matthews_corrcoef(truth, guess), abs=1e-12)
    np.testing.assert_allclose(scores["recall"][0], recall_score(truth, guess, average=None))

    lengths = np.log([len(r.sequence) for r in test.records])
    noisy = lengths + np.random.default_rng(0).normal(0, 0.5, len(lengths))
    found = regression_scores(lengths[None], noisy[None])
    assert found["spearman"][0] == pytest.approx(spearmanr(lengths, noisy).statistic, abs=1e-12)
    assert found["rmse"][0] == pytest.approx(np.sqrt(np.mean((lengths - noisy) ** 2)))


def test_composition_baseline_beats_chance_on_deeploc(deeploc, composition_run):
    """Amino-acid composition + log length, fitted on the 1,678 training proteins: the lower end
    of its 95% interval clears the commonest class's share of the test set by 10 points."""
    probe, selection, _, predicted = composition_run
    _, test = deeploc
    figures = evaluate_predictions("classification", np.asarray(test.labels),
                                   {"composition": predicted, "again": predicted},
                                   classes=probe.classes)  # fmt: skip
    chance = max(test.labels.count(name) for name in probe.classes) / len(test.labels)
    accuracy, mcc = figures["composition"]["accuracy"], figures["composition"]["mcc"]
    assert accuracy.low > chance + MARGIN_OVER_CHANCE, (accuracy, chance)
    assert mcc.low > 0.2, mcc
    assert figures["difference"]["accuracy"].value == 0 and selection.value in selection.grid


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_proteins(
    deeploc, composition_run
):
    probe, _, _, predicted = composition_run
    truth = np.asarray(deeploc[1].labels)
    rows = np.random.default_rng(0).permutation(len(truth))[:300]
    widths = []
    for chosen in (rows, np.arange(len(truth))):
        figures = evaluate_predictions("classification", truth[chosen],
                                       {"a": predicted[chosen], "b": truth[chosen]},
                                       classes=probe.classes)  # fmt: skip
        for row in ("a", "difference"):
            for name in ("accuracy", "mcc"):
                estimate = figures[row][name]
                assert estimate.low <= estimate.value <= estimate.high, (row, name, estimate)
        assert figures["b"]["accuracy"].value == 1.0
        recalls = [r for r in figures["a"]["recall"] if np.isfinite(r.low)]
        assert all(r.low <= r.value <= r.high for r in recalls)
        widths.append({name: figures["a"][name].high - figures["a"][name].low
                       for name in ("accuracy", "mcc")})  # fmt: skip
    assert widths[1]["accuracy"] < 0.6 * widths[0]["accuracy"], widths
    assert widths[1]["mcc"] < 0.6 * widths[0]["mcc"], widths


def test_regularisation_is_chosen_from_training_labels_only(deeploc):
    """Shuffled test labels change the test figures, never the chosen C or the probe."""
    full, test = deeploc
    train = Labelled(full.fasta, full.records[::3], full.labels[::3])  # a third: faster
    records = train.records + test.records
    x = composition_features([r.sequence for r in records])
    spec = FeatureSpec("composition", "none", (0,), ("mean",), x.shape[1])
    shuffled = list(np.random.default_rng(0).permutation(test.labels))
    results = []
    for labels in (test.labels, shuffled):
        held_out = Labelled(test.fasta, test.records, labels)
        probe, report = fit_and_report(
            "classification", x, x, train, held_out, spec=spec, source=LabelSource(field=2),
            folds=5, seed=0, resamples=200,
        )  # fmt: skip
        results.append((probe, report))
    (first, one), (second, two) = results
    assert one["cross_validation"] == two["cross_validation"]
    np.testing.assert_array_equal(first.coef, second.coef)
    accuracy = [r["figures"]["embeddings"]["accuracy"]["value"] for r in (one, two)]
    assert accuracy[1] < accuracy[0] - 0.15, accuracy


def test_fit_report_save_and_predict_end_to_end(small_split, tiny_models, tmp_path, capsys,
                                                single_torch_thread):  # fmt: skip
    """fit writes the probe and its report; predict, in a new process's manner (from the files
    alone), gives what the probe fitted in memory gives; other weights are refused."""
    train, test = small_split
    model, other = tiny_models
    out = tmp_path / "probe"
    options = ["--layers", 0, -1, "--pooling", "mean", "bos", "n-term"]
    assert _run("probe", "fit", train, "--test", test, "--model", model, "-o", out,
                "--label-regex", DEEPLOC_LABEL_REGEX, "--folds", 3, *options) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "probe.json", "probe.safetensors", "report.json", "report.md"]  # fmt: skip
    assert printed == (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert len(report["classes"]) == 10 and report["features"]["size"] == 2 * 3 * 32
    assert report["test"]["proteins"] == len(read_fasta(test)[0])
    for row in ("embeddings", "composition", "difference"):
        assert all(_within(report["figures"][row][name]) for name in ("accuracy", "mcc"))

    predictions = tmp_path / "predictions.csv"
    assert _run("probe", "predict", out, test, "-o", predictions) == 0
    rows = _read_csv(predictions)
    # The probe in memory: the same features and fit, without the files.
    records = read_fasta(train)[0] + read_fasta(test)[0]
    x, _ = compute_features(records, model=str(model), embeddings=(), layers=(0, -1),
                            pooling=("mean", "bos", "n-term"), run=RunOptions())  # fmt: skip
    n = len(read_fasta(train)[0])
    labels = read_split(train, None, LabelSource(regex=DEEPLOC_LABEL_REGEX), "classification",
                        folds=3)[0].labels  # fmt: skip
    probe, _ = fit_probe(x[:n], labels, task="classification", folds=3)
    expected = probe.probabilities(x[n:])
    assert [row["id"] for row in rows] == [r.id for r in records[n:]]
    assert [row["prediction"] for row in rows] == list(probe.predict(x[n:]))
    found = np.array([[float(row[f"p_{name}"]) for name in probe.classes] for row in rows])
    np.testing.assert_allclose(found, expected, atol=1e-6)
    saved, _ = load_probe(out)
    np.testing.assert_array_equal(saved.coef, probe.coef)

    capsys.readouterr()
    assert _run("probe", "predict", out, test, "--model", other, "-o", tmp_path / "x.csv") == 1
    assert "not the weights this probe was fitted on" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_regression_of_a_composition_derived_target(small_split, tiny_models, tmp_path, capsys,
                                                    single_torch_thread):  # fmt: skip
    """Ridge on the mean token embeddings (layer 0, linear in the composition) predicts the
    fraction of hydrophobic residues (AILMFVW), a target computed from the sequence: Spearman
    near 1 on held-out proteins, in the report and in predict's CSV."""
    train, test = small_split
    table = tmp_path / "hydrophobic.csv"
    truth = {}
    for path in (train, test):
        for record in read_fasta(path)[0]:
            truth[record.id] = sum(record.sequence.count(a) for a in HYDROPHOBIC) / len(
                record.sequence
            )
    table.write_text("id,label\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    out = tmp_path / "probe"
    assert _run("probe", "fit", train, "--test", test, "--model", tiny_models[0], "-o", out,
                "--task", "regression", "--labels", table, "--layers", 0) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    spearman = report["figures"]["embeddings"]["spearman"]
    assert spearman["low"] > 0.9 and _within(spearman), spearman
    assert report["cross_validation"]["parameter"] == "alpha"
    assert _run("probe", "predict", out, test, "-o", tmp_path / "p.csv") == 0
    rows = _read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "prediction"]
    from scipy.stats import spearmanr

    rho = spearmanr(
        [truth[r["id"]] for r in rows], [float(r["prediction"]) for r in rows]
    ).statistic
    assert rho == pytest.approx(spearman["value"], abs=1e-6)


def test_embeddings_files_give_the_model_features(small_split, tiny_models, tmp_path, capsys,
                                                  single_torch_thread):  # fmt: skip
    """Features read from `protperf embed --per-residue` files equal those computed from the
    model; a file of other weights is refused, and so is a pooling the file cannot give."""
    from protperf.pretrained import load_model

    train, test = small_split
    model, other = tiny_models
    files = {}
    for path, weights in ((train, model), (test, model), (test, other)):
        h5 = tmp_path / f"{path.stem}-{weights.name}.h5"
        embed = ["embed", path, "--model", weights, "-o", h5, "--per-residue", "--layers", 0, -1]
        assert _run(*embed) == 0
        files[path.stem, weights.name] = h5
    records = read_fasta(test)[0]
    pooling = ("mean", "max", "std", "n-term", "c-term")
    opened = [open_embedding_file(files["test", "a"])]
    from_file = file_features(opened, [r.id for r in records], layers=[2, 0], pooling=pooling)
    from_model = model_features(load_model(model), [encode(r.sequence) for r in records],
                                layers=[2, 0], pooling=pooling)  # fmt: skip
    np.testing.assert_allclose(from_file, from_model, atol=1e-5)

    out = tmp_path / "probe"
    regex = ["--label-regex", DEEPLOC_LABEL_REGEX, "--folds", 3]
    assert _run("probe", "fit", train, "--test", test, "-o", out, *regex, "--embeddings",
                files["train", "a"], files["test", "a"], "--pooling", "mean",
                "c-term") == 0  # fmt: skip
    capsys.readouterr()
    assert _run("probe", "predict", out, test, "-o", tmp_path / "p.csv", "--embeddings",
                files["test", "b"]) == 1  # fmt: skip
    assert "not the weights this probe was fitted on" in capsys.readouterr().err
    assert _run("probe", "fit", train, "--test", test, "-o", tmp_path / "p2", *regex,
                "--embeddings", files["train", "a"], files["test", "a"],
                "--pooling", "bos") == 1  # fmt: skip
    assert "embeddings files hold no <bos> states" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()


def test_deeploc_benchmark_scores_the_option_cross_validation_chose(small_split, tiny_models,
                                                                     capsys):  # fmt: skip
    """benchmarks/deeploc.py on the small split: both composition rows, the model's defaults and
    the option with the best cross-validation accuracy (bold among the 10 tried)."""
    import deeploc

    train, test = small_split
    assert deeploc.main(["--no-packaged", "--model", str(tiny_models[0]), "--train", str(train),
                         "--test", str(test), "--folds", "2", "--resamples", "50",
                         "--threads", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    headers = ("| features", "| model")
    rows = [line for line in out.splitlines()
            if line.startswith("| ") and not line.startswith(headers)]  # fmt: skip
    headline = [row for row in rows if "[" in row]
    assert [row.split(" | ")[0] for row in headline[:2]] == [
        "| amino-acid composition + log length",
        "| composition + log length + N-/C-terminal 32 composition"]  # fmt: skip
    assert "layer 2, mean (defaults" in headline[2] and "CV-chosen)" in headline[-1]
    options = [row for row in rows if row.startswith(f"| {tiny_models[0]} |")]
    assert len(options) == len(deeploc.LAYER_SETS) * len(deeploc.POOLINGS) == 10
    scores = [float(row.split(" | ")[-1].strip(" |*")) for row in options]
    chosen = [row for row in options if "**" in row]
    assert len(chosen) == 1 and float(chosen[0].split(" | ")[-1].strip(" |*")) == max(scores)
    assert chosen[0].split(" | ")[1].strip("*") in headline[-1]
