"""DeepLoc: subcellular localisation (10 classes) from frozen embeddings, as `protperf probe` fits.

The protocol of ../shared/data/deeploc/README.md: every setting is chosen on the training subset
(deeploc-train-subset.fasta, 1,678 proteins) by cross-validation, then the test set
(deeploc-test.fasta, 2,768 proteins) is scored once for each row. The label is the compartment of
the header's second field (``Cytoplasm-Nucleus-U`` counts as Cytoplasm).

Rows, each logistic regression on standardised features with C chosen by 5-fold stratified
cross-validation on the training subset (protperf.probing.predictor):

- the composition baselines: amino-acid composition + log length; and with the composition of
  the N- and C-terminal 32 residues added (what the ``n-term``/``c-term`` pooling could learn
  from sequence alone);
- each packaged model (every one ``protperf models`` lists) and each ``--model``, twice: with
  ``protperf probe fit``'s defaults (the last layer, mean pooling), and with the layers and
  pooling chosen among :data:`POOLINGS` x :data:`LAYER_SETS` by the same cross-validation
  (its accuracy on the training subset; ties go to the earlier, smaller option).

Each row: test accuracy and Matthews correlation with percentile 95% intervals from 1,000
bootstrap resamples of the test proteins (seed 0). A second table gives every option's
cross-validation accuracy; only the chosen one is scored on the test set.

    python benchmarks/deeploc.py --threads 1                  # the packaged models
    python benchmarks/deeploc.py --model runs/my-run          # and a run or an export
    python benchmarks/deeploc.py --no-packaged --model runs/x --cache /tmp/deeploc-features

Each model's features (every layer, every pooling) are computed once, in one pass over the
4,446 proteins; ``--cache DIR`` keeps them, by the fingerprint of the weights, for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEEPLOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "deeploc"
TRAIN, TEST = DEEPLOC / "deeploc-train-subset.fasta", DEEPLOC / "deeploc-test.fasta"
#: The compartment: the header's second field up to its first '-' (Cytoplasm-Nucleus-U too).
DEEPLOC_LABEL_REGEX = r"^\S+ ([^-\s]+)"
#: Every pooling computed once per model, in this order.
ALL_POOLING = ("mean", "max", "std", "bos", "eos", "n-term", "c-term")
#: The poolings tried; "token" is the model's summary position, <eos> for a causal model (the
#: one position that has read the whole protein), <bos> for a masked one.
POOLINGS = (("mean",), ("mean", "token"), ("mean", "max"), ("mean", "std"),
            ("mean", "n-term", "c-term"))  # fmt: skip
#: The layers tried: the last one, and every block's output concatenated (ESM numbering).
LAYER_SETS = ("last", "blocks")
#: Published DeepLoc test accuracies, fitted on the full training set (about 6x the subset):
#: context for the table, not rows measured here.
PUBLISHED = {"DeepLoc (Almagro Armenteros et al. 2017)": 0.78,
             "light attention on ProtT5 (Stärk et al. 2021)": 0.86}  # fmt: skip


@dataclass(frozen=True)
class Option:
    """A choice of layers and pooling for one model."""

    layers: str  # a LAYER_SETS name
    pooling: tuple[str, ...]  # POOLINGS entry, "token" resolved

    def describe(self, depth: int) -> str:
        layers = f"layer {depth}" if self.layers == "last" else f"layers 1-{depth}"
        return f"{layers}, {' + '.join(self.pooling)}"

    def layer_indices(self, depth: int) -> list[int]:
        return [depth] if self.layers == "last" else list(range(1, depth + 1))


@dataclass
class Row:
    """A row of the table: its name, the features' size, the CV accuracy on the training
    subset and the test figures."""

    name: str
    size: int
    cv_accuracy: float
    regularisation: float
    figures: dict


def read_split(train: Path, test: Path, folds: int):
    """(training Labelled, test Labelled) of DeepLoc, labels from the header."""
    from protperf.probe import LabelSource, read_split

    source = LabelSource(regex=DEEPLOC_LABEL_REGEX)
    return read_split(train, test, source, "classification", folds=folds)


def model_features(name: str, records, cache: Path | None, tokens_per_batch: int):
    """(N, depth + 1, len(ALL_POOLING), D) features of every layer and pooling, the model's
    config, and its fingerprint; read from / written to ``cache`` when given."""
    from protperf.inference import weights_fingerprint
    from protperf.pretrained import load_model
    from protperf.probing.features import model_features as pooled
    from protperf.tokenizer import encode

    model = load_model(name)
    fingerprint = weights_fingerprint(model)
    cached = None if cache is None else cache / f"{fingerprint.split(':')[1][:16]}.npy"
    if cached is not None and cached.is_file():
        return np.load(cached), model.config, fingerprint
    started = time.perf_counter()
    sequences = [encode(record.sequence) for record in records]
    layers = list(range(model.config.depth + 1))
    features = pooled(model, sequences, layers=layers, pooling=ALL_POOLING,
                      tokens_per_batch=tokens_per_batch)  # fmt: skip
    print(f"{name}: features of {len(records):,} proteins in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)  # fmt: skip
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cached, features)
    return features, model.config, fingerprint


def select(features: np.ndarray, option: Option, depth: int) -> np.ndarray:
    """(N, F) columns of ``option`` from all features (N, depth + 1, P_all, D)."""
    parts = [ALL_POOLING.index(part) for part in option.pooling]
    chosen = features[:, option.layer_indices(depth)][:, :, parts]
    return chosen.reshape(len(features), -1)


def options_for(causal: bool) -> list[Option]:
    token = "eos" if causal else "bos"
    return [
        Option(layers, tuple(token if part == "token" else part for part in pooling))
        for layers in LAYER_SETS
        for pooling in POOLINGS
    ]


def score_row(name, train_x, test_x, train_set, test_set, reference, args):
    """Fit on the training subset (C by CV), score the test set once: (a Row, the probe's test
    predictions). ``reference``: the composition row's test predictions (None: this is it)."""
    from protperf.probing.figures import evaluate_predictions
    from protperf.probing.predictor import fit_probe

    probe, selection = fit_probe(train_x, train_set.labels, task="classification",
                                 folds=args.folds, seed=args.seed)  # fmt: skip
    predicted = probe.predict(test_x)
    predictions = {"row": predicted, "composition": predicted if reference is None else reference}
    figures = evaluate_predictions("classification", test_set.targets("classification"),
                                   predictions, classes=probe.classes, resamples=args.resamples,
                                   seed=args.seed)  # fmt: skip
    return Row(name, train_x.shape[1], selection.score, selection.value, figures), predicted


def composition_rows(train_set, test_set, args) -> tuple[list[Row], np.ndarray]:
    """The two composition rows, and the first one's test predictions (every row's peer)."""
    from protperf.probing.features import composition_features

    rows, reference = [], None
    for name, pooling in (("amino-acid composition + log length", ()),
                          ("composition + log length + N-/C-terminal 32 composition",
                           ("n-term", "c-term"))):  # fmt: skip
        x = [composition_features([r.sequence for r in s.records], pooling)
             for s in (train_set, test_set)]  # fmt: skip
        row, predicted = score_row(name, x[0], x[1], train_set, test_set, reference, args)
        reference = predicted if reference is None else reference
        rows.append(row)
    return rows, reference


def model_rows(name, train_set, test_set, reference, args) -> tuple[list[Row], list[tuple]]:
    """A model's two rows (the verb's defaults, the CV-chosen option) and every option's CV."""
    from protperf.probing.predictor import fit_probe

    records = train_set.records + test_set.records
    features, config, _ = model_features(name, records, args.cache, args.tokens_per_batch)
    n, depth = len(train_set.records), config.depth
    tried = []
    for option in options_for(config.causal):
        x = select(features[:n], option, depth)
        started = time.perf_counter()
        _, selection = fit_probe(x, train_set.labels, task="classification", folds=args.folds,
                                 seed=args.seed)  # fmt: skip
        tried.append((option, x.shape[1], selection.value, selection.score))
        print(f"  {name}, {option.describe(depth)}: CV accuracy {selection.score:.4f} "
              f"(C {selection.value:g}; {time.perf_counter() - started:.0f} s)",
              file=sys.stderr)  # fmt: skip
    best = max(tried, key=lambda entry: entry[3])[0]  # max keeps the first of equals
    default = options_for(config.causal)[0]
    scored = [("defaults", default), ("CV-chosen", best)] if best != default else [
        ("defaults, CV-chosen", best)]  # fmt: skip
    rows = []
    for label, option in scored:
        x = [select(part, option, depth) for part in (features[:n], features[n:])]
        row, _ = score_row(f"{name}: {option.describe(depth)} ({label})", x[0], x[1],
                           train_set, test_set, reference, args)  # fmt: skip
        rows.append(row)
    return rows, [(name, option.describe(depth), size, c, score, option == best)
                  for option, size, c, score in tried]  # fmt: skip


def format_tables(rows: list[Row], tried: list[tuple]) -> str:
    """The headline table and the table of every option's cross-validation."""
    from protperf.probing.figures import format_estimate

    lines = ["| features | test accuracy (%) [95% CI] | MCC [95% CI] | CV accuracy (%) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        figures = row.figures["row"]
        lines.append(f"| {row.name} | {format_estimate(figures['accuracy'], True)} | "
                     f"{format_estimate(figures['mcc'], False)} | "
                     f"{row.cv_accuracy * 100:.1f} |")  # fmt: skip
    lines += ["", "| model | layers, pooling | features | C | CV accuracy (%) |",
              "|---|---|---:|---:|---:|"]  # fmt: skip
    for name, option, size, c, score, chosen in tried:
        mark = "**" if chosen else ""
        lines.append(f"| {name} | {mark}{option}{mark} | {size:,} | {c:g} | "
                     f"{mark}{score * 100:.1f}{mark} |")  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="a run, an export or a .ckpt to add (repeatable)")  # fmt: skip
    parser.add_argument("--no-packaged", action="store_true", help="leave the packaged models out")
    parser.add_argument("--train", type=Path, default=TRAIN)
    parser.add_argument("--test", type=Path, default=TEST)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the features")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON too")
    args = parser.parse_args(argv)

    import torch

    from protperf.pretrained import packaged_models

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, test_set = read_split(args.train, args.test, args.folds)
    rows, reference = composition_rows(train_set, test_set, args)
    tried: list[tuple] = []
    models = ([] if args.no_packaged else list(packaged_models())) + args.model
    for name in models:
        found, options = model_rows(name, train_set, test_set, reference, args)
        rows += found
        tried += options
    print(f"DeepLoc: fitted on {len(train_set.records):,} proteins of {args.train.name}, "
          f"scored once on {len(test_set.records):,} of {args.test.name}; {machine()}; "
          f"{time.perf_counter() - started:.0f} s\n")  # fmt: skip
    print(format_tables(rows, tried))
    published = "; ".join(f"{name} {value:.0%}" for name, value in PUBLISHED.items())
    print(f"\nPublished, fitted on the full training set (context, not rows): {published}")
    if args.json is not None:
        from protperf.probing.figures import as_plain

        document = [{"name": r.name, "features": r.size, "cv_accuracy": r.cv_accuracy,
                     "C": r.regularisation, "test": as_plain(r.figures)} for r in rows]  # fmt: skip
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
