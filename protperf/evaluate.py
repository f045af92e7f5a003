"""`protperf evaluate`: accuracy and perplexity per split next to the empirical unigram baseline.

    protperf evaluate [--model MODEL] [--data DIR] [--split test ood valid ...] [--format table|json]
        [--concat] [--seed S] [--tokens-per-batch N] [--device cpu|cuda]

The numbers are the paper's (Table 2) and the training run's: token-weighted accuracy and
perplexity = exp(mean cross-entropy) over the predicted tokens. A unidirectional model predicts
every next token of ``<bos> sequence <eos>`` (residues and ``<eos>``); a bidirectional one the
15% of residues selected by BERT's masking (80% ``<mask>``, 10% random, 10% kept), drawn from
per-sequence seeds derived from ``--seed`` exactly as in ``protperf train``'s evaluation, so with
the training seed the results equal the run's logged test metrics. Single sequences are cropped
to the model's ``max_length`` (fixed crops, as in training); ``--concat`` reads the concat chunks.

The baseline predicts every token from the unigram frequencies of the train split, Laplace
smoothed: p(t) = (count(t) + 1) / (total + |support|), the support being the 25 residues (and
``<eos>``, once per sequence, for the unidirectional model). It is scored on exactly the tokens
the model is scored on; its accuracy is the frequency of its single guess (the most frequent
residue) among them.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from protperf import runtime
from protperf.commandline import run_verb
from protperf.data.errors import DataError
from protperf.data.publish import DATA_DIR, find_dataset
from protperf.errors import InputError
from protperf.inference import LoadedModel, Precision, autocast, load_for_inference
from protperf.objectives import IGNORE_INDEX, MaskingConfig, objective_batch, token_statistics
from protperf.runtime import MatmulPrecision
from protperf.tokenizer import EOS, FIRST_RESIDUE_ID, VOCAB_SIZE

BASELINE_NAME = "empirical unigram baseline"
DEFAULT_TOKENS_PER_BATCH = 16384
_COUNT_CHUNK = 1 << 26  # tokens read at a time when counting the train split


# ---------------------------------------------------------------------------------------------
# The unigram baseline
# ---------------------------------------------------------------------------------------------


def unigram_counts(train_path: str | Path, *, with_eos: bool) -> np.ndarray:
    """Token counts (VOCAB_SIZE,) int64 of a split file's residues, plus one ``<eos>`` per
    sequence when ``with_eos`` (the unidirectional model predicts it)."""
    import h5py

    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    with h5py.File(train_path, "r") as f:
        tokens = f["tokens"]
        for start in range(0, tokens.shape[0], _COUNT_CHUNK):
            chunk = tokens[start : start + _COUNT_CHUNK]
            counts += np.bincount(chunk, minlength=VOCAB_SIZE)[:VOCAB_SIZE]
        if with_eos:
            counts[EOS] += f["offsets"].shape[0] - 1
    return counts


def unigram_log_probs(counts: np.ndarray, *, with_eos: bool) -> np.ndarray:
    """Laplace-smoothed log-probabilities (VOCAB_SIZE,) float64; -inf outside the support
    (the residues, plus ``<eos>`` when ``with_eos``)."""
    support = list(range(FIRST_RESIDUE_ID, VOCAB_SIZE)) + ([EOS] if with_eos else [])
    log_probs = np.full(VOCAB_SIZE, -np.inf)
    smoothed = counts[support].astype(np.float64) + 1.0
    log_probs[support] = np.log(smoothed / smoothed.sum())
    return log_probs


def score_unigram(log_probs: np.ndarray, target_counts: np.ndarray) -> tuple[float, float]:
    """(accuracy, perplexity) of always predicting ``log_probs`` on targets with these counts."""
    total = target_counts.sum()
    if total == 0:
        return math.nan, math.nan
    with np.errstate(invalid="ignore"):
        nll = -(target_counts * np.where(target_counts > 0, log_probs, 0.0)).sum() / total
    accuracy = target_counts[int(np.argmax(log_probs))] / total
    return float(accuracy), float(math.exp(nll))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _chunk_length(path: Path) -> int:
    """Length of a split file's concat chunks (1 when it has none: the data module reports it)."""
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["concat"].shape[1]) if "concat" in f else 1


@dataclass
class Scores:
    """Token-weighted accuracy (a fraction) and perplexity."""

    accuracy: float
    perplexity: float


@dataclass
class SplitResult:
    """One split: the model's and the baseline's scores on the same ``tokens`` targets."""

    split: str
    items: int
    tokens: int
    model: Scores
    baseline: Scores
    target_counts: list[int] = field(repr=False)


@torch.no_grad()
def evaluate_loader(
    loaded: LoadedModel,
    loader: Any,
    *,
    masking: MaskingConfig | None = None,
    precision: Precision = "32",
    progress: Any | None = None,
) -> tuple[float, float, int, int, np.ndarray]:
    """Run the model over a data-module loader.

    Returns (sum of cross-entropies, correct predictions, predicted tokens, items, target
    counts (VOCAB_SIZE,) int64); sums are float64, as the training metrics'.
    """
    device, model = loaded.device, loaded.model
    nll_sum = correct_sum = 0.0
    count = items = 0
    target_counts = torch.zeros(VOCAB_SIZE, dtype=torch.int64)
    for batch in loader:
        prepared = objective_batch(batch, causal=loaded.config.causal, masking=masking)
        inputs, targets, input_padding = (
            prepared["inputs"], prepared["targets"], prepared["padding_mask"]
        )  # fmt: skip
        with autocast(device, precision):
            logits = model(
                inputs.to(device), None if input_padding is None else input_padding.to(device)
            )["logits"]
        nll, correct, counted = token_statistics(logits, targets.to(device))
        nll_sum += float((nll.double() * counted).sum())
        correct_sum += float(correct.double().sum())
        count += int(counted.sum())
        items += inputs.shape[0]
        predicted = targets[targets != IGNORE_INDEX]
        target_counts += torch.bincount(predicted, minlength=VOCAB_SIZE)[:VOCAB_SIZE]
        if progress is not None:
            progress.update(1)
    return nll_sum, correct_sum, count, items, target_counts.numpy()


def evaluate_model(
    loaded: LoadedModel,
    data: str | Path,
    splits: Sequence[str],
    *,
    concat: bool = False,
    seed: int = 0,
    max_length: int | None = None,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    precision: Precision = "32",
    explicit_splits: bool = True,
    show_progress: bool = True,
) -> list[SplitResult]:
    """Evaluate ``loaded`` on ``splits`` of a prepared dataset, with the unigram baseline.

    Splits that are absent or empty raise :class:`InputError` when ``explicit_splits``, and
    are skipped with a note on stderr otherwise.
    """
    from protperf.data.datamodule import LoaderConfig, ProteinDataModule

    data = Path(data)
    config = loaded.config
    check_data(data, splits)
    train_path = data / "train.h5"
    if max_length is None:
        max_length = config.max_length
    limited = config.length_limit is not None
    if max_length < 2 or (limited and max_length > config.max_length):
        raise InputError(
            f"--max-length {max_length}: must be in [2, {config.max_length}] for this model"
        )
    if concat and not limited:
        max_length = sys.maxsize  # chunks are read whole; rotary positions have no cap
    if tokens_per_batch <= 0:
        raise InputError(f"--tokens-per-batch must be positive, got {tokens_per_batch}")
    loader_config = LoaderConfig(
        batch_size=1, token_budget=tokens_per_batch, num_workers=0, pin_memory=False
    )
    datamodule = ProteinDataModule(
        data, concat=concat, max_length=max_length, loader=loader_config, seed=seed
    )
    with_eos = config.causal
    with _reading(train_path):
        counts = unigram_counts(train_path, with_eos=with_eos)
    log_probs = unigram_log_probs(counts, with_eos=with_eos)
    results = []
    for split in splits:
        path = data / f"{split}.h5"
        with _reading(path):
            result = _evaluate_split(
                loaded, datamodule, split, path, log_probs, concat=concat,
                tokens_per_batch=tokens_per_batch, precision=precision,
                explicit=explicit_splits, show_progress=show_progress,
            )  # fmt: skip
        if result is not None:
            results.append(result)
    return results


def check_data(data: Path, splits: Sequence[str]) -> None:
    """Raise :class:`InputError` naming the file unless ``data`` holds a readable train.h5 (the
    baseline counts it) and each of ``splits`` that exists opens as a split file."""
    from protperf.data.h5 import check_split

    if not data.is_dir():
        raise InputError(f"--data {data}: no such folder (run `protperf prepare-data`)")
    train_path = data / "train.h5"
    if not train_path.is_file():
        raise InputError(f"{train_path} not found: the unigram baseline counts the train split")
    for path in [train_path, *(data / f"{split}.h5" for split in splits)]:
        if path.exists():
            check_split(path)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a read error of a split file (damage past what :func:`check_split` opens) into a
    :class:`DataError` naming it."""
    try:
        yield
    except OSError as error:  # h5py's read errors: a damaged chunk, a checksum, a filter
        if isinstance(error, FileNotFoundError):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"{path}: cannot read it ({reason}); re-run `protperf prepare-data`"
        ) from error


def _evaluate_split(
    loaded: LoadedModel,
    datamodule: Any,
    split: str,
    path: Path,
    log_probs: np.ndarray,
    *,
    concat: bool,
    tokens_per_batch: int,
    precision: Precision,
    explicit: bool,
    show_progress: bool,
) -> SplitResult | None:
    """One split's scores next to the baseline; None for a split skipped (absent or empty when
    not asked for by name)."""
    from tqdm import tqdm

    what = "concat chunks" if concat else "sequences"
    loader = None
    if path.exists():
        if concat:  # batches of whole chunks within the token budget
            datamodule.loader.eval_batch_size = max(1, tokens_per_batch // _chunk_length(path))
        try:
            loader = datamodule.eval_dataloader(split)
        except ValueError as error:  # no concat data, chunks beyond learned positions
            raise InputError(f"{path}: {error}") from error
    if loader is None:
        message = f"{path}: {'no such file' if not path.exists() else f'no {what}'}"
        if explicit:
            raise InputError(message)
        print(f"protperf evaluate: skipping {split} ({message})", file=sys.stderr)
        return None
    with tqdm(
        total=len(loader), desc=f"evaluate {split}", unit="batch", file=sys.stderr,
        leave=False, disable=not show_progress,
    ) as progress:  # fmt: skip
        nll, correct, count, items, target_counts = evaluate_loader(
            loaded, loader, masking=MaskingConfig(), precision=precision, progress=progress
        )
    if count == 0:
        raise InputError(f"{path}: no predicted tokens in {items} {what}")
    baseline = Scores(*score_unigram(log_probs, target_counts))
    model_scores = Scores(correct / count, math.exp(nll / count))
    return SplitResult(split, items, count, model_scores, baseline, target_counts.tolist())


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _set_name(split: str) -> str:
    return "OOD" if split == "ood" else split


def format_table(results: Sequence[SplitResult], *, mode: str, model_name: str) -> str:
    """A Markdown table laid out as the paper's Table 2 (accuracy in %, perplexity)."""
    kind = "UNI" if mode == "unidirectional" else "BID"
    rows = [("type", "set", "model", "acc (%)", "ppl", "tokens")]
    for result in results:
        for name, scores in ((BASELINE_NAME, result.baseline), (model_name, result.model)):
            rows.append(
                (
                    kind,
                    _set_name(result.split),
                    name,
                    f"{100 * scores.accuracy:.2f}",
                    f"{scores.perplexity:.2f}",
                    f"{result.tokens:,}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5}

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(
        "-" * (width + 1) + ":" if i in right else "-" * (width + 2)
        for i, width in enumerate(widths)
    )
    return "\n".join([line(rows[0]), rule + "|", *(line(row) for row in rows[1:])])


def evaluate(
    model: str | None = None,
    data: Path | None = None,
    split: tuple[str, ...] | None = None,
    format: Literal["table", "json"] = "table",
    concat: bool = False,
    seed: int = 0,
    max_length: int | None = None,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: str = "cpu",
    precision: Precision = "32",
    float32_matmul_precision: MatmulPrecision = "high",
) -> list[SplitResult]:
    """Evaluate a model on prepared splits: accuracy and perplexity next to the unigram baseline.

    Prints a table laid out as the paper's Table 2 (or JSON): per split, the empirical unigram
    baseline (train-split frequencies, Laplace smoothed) and the model, scored on the same
    tokens: next tokens for a unidirectional model, masked residues (15%, 80/10/10, seeded as in
    training) for a bidirectional one.

    Args:
        model: a packaged model's name, a run folder, an export folder or a Lightning .ckpt
            (default: the most recent export under ./runs).
        data: a folder written by `protperf prepare-data` (train.h5 needed for the baseline;
            default: the one prepared dataset under ./data).
        split: splits to evaluate (default: test ood; with --concat: valid).
        format: table (Markdown, as the paper's Table 2) or json.
        concat: evaluate on the concat chunks instead of single sequences.
        seed: seed of the crops and masks (training's --seed reproduces its test metrics).
        max_length: crop length of single sequences in tokens, <bos>/<eos> included (default:
            the model's max_length, as in training).
        tokens_per_batch: padded tokens per batch.
        device: cpu, cuda or cuda:N.
        precision: 32 (float32) or bf16-mixed / 16-mixed autocast.
        float32_matmul_precision: float32 products: high = TF32 on CUDA (FAVOR+ computes in
            float32 even under autocast), highest = IEEE float32, medium = bfloat16 on
            CPUs with AMX too. A CPU gives the same numbers with high and highest.
    """
    if data is None:
        data = find_dataset()
        print(f"using --data {data} (the prepared dataset under {DATA_DIR}/)", file=sys.stderr)
    explicit = split is not None
    splits = list(split) if split is not None else (["valid"] if concat else ["test", "ood"])
    check_data(Path(data), splits)  # a damaged file fails before the model loads
    loaded = load_for_inference(model, device)
    with runtime.float32_matmul_precision(float32_matmul_precision):
        results = evaluate_model(
            loaded,
            data,
            splits,
            concat=concat,
            seed=seed,
            max_length=max_length,
            tokens_per_batch=tokens_per_batch,
            precision=precision,
            explicit_splits=explicit,
        )
    if not results:
        raise InputError(f"{data}: none of the splits {splits} holds data")
    if format == "json":
        report = {
            "model": str(loaded.path),
            "model_name": loaded.name,
            "mode": loaded.mode,
            "kernel": loaded.config.kernel,
            "data": str(data),
            "concat": concat,
            "seed": seed,
            "max_length": None if concat else (max_length or loaded.config.max_length),
            "splits": {
                r.split: {
                    "items": r.items,
                    "tokens": r.tokens,
                    "model": asdict(r.model),
                    "baseline": asdict(r.baseline),
                }
                for r in results
            },
        }
        print(json.dumps(report, indent=2))
    else:
        crop = (
            "concat chunks"
            if concat
            else f"single sequences cropped to {max_length or loaded.config.max_length} tokens"
        )
        print(f"model: {loaded.path} ({loaded.describe()})")
        print(f"data: {data} ({crop}; seed {seed})\n")
        print(format_table(results, mode=loaded.mode, model_name=loaded.name))
    return results


def main(argv: list[str]) -> int:
    """``protperf evaluate``: parse ``argv`` and evaluate; returns the exit status."""
    return run_verb(evaluate, argv, prog="protperf evaluate", threads=True)
