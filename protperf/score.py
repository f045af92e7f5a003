"""`protperf score`: how likely a model finds each protein, and the effects of mutations.

    protperf score sequences.fasta [--model MODEL] [-o scores.csv] [--mutations muts.csv]
        [--tokens-per-batch N] [--device cpu|cuda] [--precision 32|bf16-mixed] [--overwrite]

Proteins are read as ``<bos> sequence <eos>``, whole, never cropped. Log-probabilities are natural
logarithms over the model's whole vocabulary, and a protein's score sums over its residues only:

- a causal (unidirectional) model gives the exact log-likelihood
  ``sum_i log p(x_i | <bos>, x_1..x_{i-1})``. ``<eos>`` is not counted, so that the score covers
  the same L residues as a masked model's and says nothing about where the protein ends;
- a masked (bidirectional) model gives the pseudo-log-likelihood ``sum_i log p(x_i | x_{-i})``:
  one forward pass per residue, with that residue replaced by ``<mask>`` and its
  log-probability read at that position (L passes for L residues).

Each protein's row: ``id, length, log_likelihood, mean_log_likelihood`` (per residue) and
``perplexity = exp(-mean_log_likelihood)``.

With ``--mutations`` (a CSV with the columns ``id``, a FASTA id, and ``mutation``: ``A12G``, the
wild-type letter, its 1-based position and the mutant letter, or several joined by ``:``), each
row is scored as ESM-1v scores variants:

- masked model: ``masked_marginal``, all mutated positions masked together and
  ``sum_j log p(mt_j) - log p(wt_j)`` read at them; and ``wt_marginal``, the same sum read from
  one pass over the unmasked wild type;
- causal model: ``log_likelihood_ratio = LL(mutant) - LL(wild type)``, both exact.

Forward passes (a protein, some residues masked) are batched by a token budget, longest first,
as :mod:`protperf.embed` batches proteins; padding is masked, so a score does not depend on the
batch it was computed in. Equal passes run once: one pass per masked position set, so that all
19 substitutions at a site share it, and one per distinct mutant sequence.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protperf import runtime
from protperf.commandline import run_verb
from protperf.durable import atomic_file, check_output_file
from protperf.embed import DEFAULT_TOKENS_PER_BATCH, default_output, forward_batches
from protperf.errors import InputError
from protperf.fasta import ALPHABET, FastaRecord, read_fasta
from protperf.inference import Precision, load_for_inference
from protperf.model import PerformerLM
from protperf.runtime import MatmulPrecision
from protperf.tokenizer import MASK, encode

#: The columns a mutations file must have.
MUTATION_COLUMNS = ("id", "mutation")
_MUTATION = re.compile(r"([A-Za-z])([0-9]+)([A-Za-z])")
_FORM = "the form A12G (wild-type letter, 1-based position, mutant letter; several joined by ':')"


# ---------------------------------------------------------------------------------------------
# Forward passes: the model's distribution for chosen residues
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One forward pass: protein ``sequence`` (an index) with the residues at ``masked`` (0-based)
    replaced by ``<mask>``, read at the residues ``read`` (0-based; None: every residue)."""

    sequence: int
    masked: tuple[int, ...] = ()
    read: tuple[int, ...] | None = None


@torch.no_grad()
def pass_log_probs(
    model: PerformerLM,
    sequences: Sequence[np.ndarray],
    passes: Sequence[Pass],
    *,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: torch.device | str = "cpu",
    precision: Precision = "32",
    progress: Callable[[Pass], None] | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Run ``passes`` batched by a token budget (longest first), in batch order.

    Args:
        model: an eval-mode model on ``device``, causal or masked.
        sequences: residue token ids of each protein (no special tokens), each (L_i,).
        passes: what to run; a pass costs L_i + 2 tokens of the budget.
        progress: called with each pass once it is done.

    Yields:
        (index into ``passes``, log-probabilities (R, V) float32 on the CPU), row r the model's
        distribution for residue ``read[r]``: for a causal model the prediction from the tokens
        before it (its logits at the previous position), for a masked model the logits at it.
    """
    device = torch.device(device)
    offset = 0 if model.config.causal else 1  # token position whose logits predict residue 0

    def residues(index: int) -> np.ndarray:
        item = passes[index]
        if not item.masked:
            return sequences[item.sequence]
        masked = sequences[item.sequence].copy()
        masked[list(item.masked)] = MASK
        return masked

    lengths = [len(sequences[p.sequence]) for p in passes]
    batches = forward_batches(
        model, lengths, residues, tokens_per_batch=tokens_per_batch, device=device,
        precision=precision,
    )  # fmt: skip
    for batch, out in batches:
        logits = out["logits"]  # (B, L_max + 2, V)
        for row, index in enumerate(batch):
            item = passes[index]
            if item.read is None:
                count = len(sequences[item.sequence])
                picked = logits[row, offset : offset + count]
            else:
                positions = torch.tensor(item.read, dtype=torch.long, device=device) + offset
                picked = logits[row, positions]
            yield index, picked.float().log_softmax(dim=-1).cpu()
            if progress is not None:
                progress(item)


def _target_sum(log_probs: Tensor, targets: np.ndarray) -> float:
    """sum_r log_probs[r, targets[r]] in float64. log_probs: (R, V); targets: (R,) ids."""
    rows = torch.arange(len(targets))
    picked = log_probs[rows, torch.from_numpy(targets.astype(np.int64))]
    return float(picked.double().sum())


def log_likelihoods(
    model: PerformerLM,
    sequences: Sequence[np.ndarray],
    *,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: torch.device | str = "cpu",
    precision: Precision = "32",
    progress: Callable[[Pass], None] | None = None,
) -> np.ndarray:
    """Each protein's log-likelihood over its residues (natural log): exact for a causal model,
    the pseudo-log-likelihood (one pass per residue masked) for a masked one.

    sequences: residue token ids, each (L_i,) -> (N,) float64.
    """
    if model.config.causal:
        passes = [Pass(i) for i in range(len(sequences))]
    else:
        passes = [Pass(i, (j,), (j,)) for i, s in enumerate(sequences) for j in range(len(s))]
    totals = np.zeros(len(sequences), dtype=np.float64)
    run = dict(tokens_per_batch=tokens_per_batch, device=device, precision=precision)
    for index, log_probs in pass_log_probs(model, sequences, passes, progress=progress, **run):
        item = passes[index]
        residues = sequences[item.sequence]
        targets = residues if item.read is None else residues[list(item.read)]
        totals[item.sequence] += _target_sum(log_probs, targets)
    return totals


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One substitution: wild-type letter, 1-based position, mutant letter."""

    wild_type: str
    position: int
    mutant: str


@dataclass(frozen=True)
class MutationRow:
    """A row of a mutations file: protein ``id`` (an index into the records too), the mutation as
    written, and its substitutions (by position)."""

    id: str
    protein: int
    text: str
    mutations: tuple[Mutation, ...]


def parse_mutations(text: str) -> tuple[Mutation, ...]:
    """``A12G`` or ``A12G:V30L`` -> its substitutions, sorted by position; raises ValueError
    (the reason, to be prefixed with the file and line) when malformed."""
    parts = [part.strip() for part in text.split(":")]
    found: list[Mutation] = []
    for part in parts:
        match = _MUTATION.fullmatch(part)
        if match is None:
            raise ValueError(f"mutation {part!r} is not of {_FORM}")
        wild_type, mutant = match.group(1).upper(), match.group(3).upper()
        for letter in (wild_type, mutant):
            if letter not in ALPHABET:
                raise ValueError(f"{part}: {letter!r} is not an amino-acid letter")
        found.append(Mutation(wild_type, int(match.group(2)), mutant))
    positions = [m.position for m in found]
    for position in positions:
        if positions.count(position) > 1:
            raise ValueError(f"{text}: position {position} is mutated more than once")
    return tuple(sorted(found, key=lambda m: m.position))


def check_mutations(mutations: Sequence[Mutation], record: FastaRecord) -> None:
    """Raise ValueError unless every position lies in ``record`` and holds the wild-type letter."""
    length = len(record.sequence)
    for m in mutations:
        name = f"{m.wild_type}{m.position}{m.mutant}"
        if not 1 <= m.position <= length:
            raise ValueError(
                f"{name}: position {m.position} is outside {record.id!r} (residues 1..{length})"
            )
        actual = record.sequence[m.position - 1]
        if actual != m.wild_type:
            raise ValueError(
                f"{name}: residue {m.position} of {record.id!r} is {actual}, not {m.wild_type}"
            )


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def read_mutations(path: Path, records: Sequence[FastaRecord], fasta: Path) -> list[MutationRow]:
    """Read and check a mutations file (CSV, or tab-separated when named ``.tsv``) against the
    proteins of ``fasta``; every problem is an :class:`InputError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--mutations {path}: no such file")
    by_id = {record.id: index for index, record in enumerate(records)}
    rows: list[MutationRow] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=_delimiter(path))
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in MUTATION_COLUMNS if name not in header]
            if missing:
                found = ", ".join(repr(name) for name in header if name) or "nothing"
                raise InputError(
                    f"{path}, line 1: no {' or '.join(map(repr, missing))} column (the header "
                    f"line has {found}; needed: {', '.join(MUTATION_COLUMNS)})"
                )
            id_column, mutation_column = (header.index(name) for name in MUTATION_COLUMNS)
            for row in reader:
                if not any(field.strip() for field in row):
                    continue  # blank line
                line = reader.line_num
                fields = [row[i].strip() if i < len(row) else "" for i in range(len(header))]
                protein_id, text = fields[id_column], fields[mutation_column]
                if protein_id not in by_id:
                    raise InputError(
                        f"{path}, line {line}: no protein {protein_id!r} in {fasta}"
                        if protein_id
                        else f"{path}, line {line}: no id"
                    )
                protein = by_id[protein_id]
                try:
                    mutations = parse_mutations(text)
                    check_mutations(mutations, records[protein])
                except ValueError as error:
                    raise InputError(f"{path}, line {line}: {error}") from None
                rows.append(MutationRow(protein_id, protein, text, mutations))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a text file ({error.reason})") from error
    except csv.Error as error:
        raise InputError(f"{path}: not a readable CSV file ({error})") from error
    if not rows:
        raise InputError(f"{path}: no mutations (a header line and nothing else)")
    return rows


def mutant_sequence(wild_type: np.ndarray, mutations: Sequence[Mutation]) -> np.ndarray:
    """The residue ids of ``wild_type`` (L,) with ``mutations`` applied: a new (L,) array."""
    mutant = wild_type.copy()
    for m in mutations:
        mutant[m.position - 1] = encode(m.mutant)[0]
    return mutant


def _substitution_sum(
    log_probs: Tensor, mutations: Sequence[Mutation], rows: Sequence[int]
) -> float:
    """sum_j log p(mt_j) - log p(wt_j), row ``rows[j]`` of log_probs (R, V) for mutation j."""
    total = 0.0
    for m, row in zip(mutations, rows, strict=True):
        mutant, wild_type = int(encode(m.mutant)[0]), int(encode(m.wild_type)[0])
        total += float(log_probs[row, mutant].double() - log_probs[row, wild_type].double())
    return total


def mutation_scores(
    model: PerformerLM,
    sequences: Sequence[np.ndarray],
    rows: Sequence[MutationRow],
    *,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: torch.device | str = "cpu",
    precision: Precision = "32",
    progress: Callable[[Pass], None] | None = None,
) -> dict[str, np.ndarray]:
    """Score each row's mutations against its wild type (``sequences[row.protein]``).

    Returns columns of (len(rows),) float64: for a masked model ``masked_marginal`` and
    ``wt_marginal``, for a causal one ``log_likelihood_ratio`` (see the module docstring).
    """
    run = dict(tokens_per_batch=tokens_per_batch, device=device, precision=precision)
    if model.config.causal:
        # Every distinct sequence once, wild types included: a synonymous mutant is exactly 0.
        keys: dict[bytes, int] = {}
        scored: list[np.ndarray] = []

        def index_of(residues: np.ndarray) -> int:
            key = residues.tobytes()
            if key not in keys:
                keys[key] = len(scored)
                scored.append(residues)
            return keys[key]

        pairs = [
            (
                index_of(sequences[row.protein]),
                index_of(mutant_sequence(sequences[row.protein], row.mutations)),
            )
            for row in rows
        ]
        totals = log_likelihoods(model, scored, progress=progress, **run)
        ratio = np.array([totals[mutant] - totals[wild] for wild, mutant in pairs])
        return {"log_likelihood_ratio": ratio}

    proteins = sorted({row.protein for row in rows})
    site_sets = sorted(
        {(row.protein, tuple(m.position - 1 for m in row.mutations)) for row in rows}
    )
    passes = [Pass(protein) for protein in proteins]
    passes += [Pass(protein, sites, sites) for protein, sites in site_sets]
    results: dict[Pass, Tensor] = {}
    for index, log_probs in pass_log_probs(model, sequences, passes, progress=progress, **run):
        results[passes[index]] = log_probs
    masked, unmasked = np.zeros(len(rows)), np.zeros(len(rows))
    for r, row in enumerate(rows):
        sites = tuple(m.position - 1 for m in row.mutations)
        masked[r] = _substitution_sum(
            results[Pass(row.protein, sites, sites)], row.mutations, range(len(sites))
        )
        unmasked[r] = _substitution_sum(results[Pass(row.protein)], row.mutations, sites)
    return {"masked_marginal": masked, "wt_marginal": unmasked}


# ---------------------------------------------------------------------------------------------
# The verb
# ---------------------------------------------------------------------------------------------


def default_score_output(fasta: Path, *, mutations: bool) -> Path:
    """``<fasta stem>.scores.csv`` (``.mutations.csv`` for mutations) beside the FASTA file."""
    stem = default_output(fasta).stem  # the name without .gz and the FASTA suffix
    return fasta.parent / f"{stem}.{'mutations' if mutations else 'scores'}.csv"


def write_table(
    out: Path, header: Sequence[str], rows: Sequence[Sequence[object]], *, overwrite: bool
) -> None:
    """Write ``rows`` under ``header`` as CSV (tab-separated when ``out`` ends in ``.tsv``),
    whole or not at all; floats with 6 decimals."""

    def text(value: object) -> object:
        return f"{value:.6f}" if isinstance(value, float | np.floating) else value

    with atomic_file(out, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=_delimiter(out), lineterminator="\n")
        writer.writerow(header)
        writer.writerows([text(value) for value in row] for row in rows)


def score(
    fasta: Path,
    model: str | None = None,
    out: Path | None = None,
    mutations: Path | None = None,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: str = "cpu",
    precision: Precision = "32",
    float32_matmul_precision: MatmulPrecision = "high",
    overwrite: bool = False,
) -> Path:
    """Score proteins (log-likelihoods) or their mutations (variant effects) with a protperf model.

    Without --mutations: one row per protein, id, length, log_likelihood, mean_log_likelihood
    and perplexity (natural log; residues only, <eos> not counted). A causal model gives the
    exact log-likelihood, a masked model the pseudo-log-likelihood (one pass per residue
    masked). With --mutations: one row per row of that file, id, mutation, then
    masked_marginal and wt_marginal (masked model) or log_likelihood_ratio (causal model).
    Proteins are never cropped. Every input is checked before the model is loaded; the output
    appears only when complete, and an existing file is replaced only with --overwrite.
    Example: protperf score proteins.fasta --mutations variants.csv

    Args:
        fasta: FASTA file (plain or gzipped) of the proteins; ids are kept as given.
        model: a packaged model's name, a run folder, an export folder or a Lightning .ckpt
            (default: the most recent export under ./runs).
        out: output table, CSV, or tab-separated when named .tsv (default: beside the FASTA
            file, <name>.scores.csv, or <name>.mutations.csv with --mutations).
        mutations: CSV (tab-separated when named .tsv) with the columns id (a FASTA id) and
            mutation: A12G (wild-type letter, 1-based position, mutant letter) or A12G:V30L.
        tokens_per_batch: token budget of a batch of forward passes (count x longest, with
            <bos>/<eos>).
        device: cpu, cuda or cuda:N.
        precision: 32 (float32) or bf16-mixed / 16-mixed autocast; scores are summed in float64.
        float32_matmul_precision: float32 products: high = TF32 on CUDA, highest = IEEE float32,
            medium = bfloat16 on CPUs with AMX too.
        overwrite: replace an existing output file.
    """
    start = time.perf_counter()
    runtime.no_primitive_cache()
    fasta = Path(fasta)
    mutations = None if mutations is None else Path(mutations)
    out = (
        Path(out)
        if out is not None
        else default_score_output(fasta, mutations=mutations is not None)
    )
    for given, option in ((fasta, "FASTA"), (mutations, "--mutations")):
        if given is not None and out.exists() and given.exists() and out.samefile(given):
            raise InputError(f"-o {out}: is the {option} input; give another output name")
    check_output_file(out, overwrite=overwrite)
    if tokens_per_batch <= 0:
        raise InputError(f"--tokens-per-batch must be positive, got {tokens_per_batch}")
    records, _ = read_fasta(fasta)
    rows = None if mutations is None else read_mutations(mutations, records, fasta)
    # Without --model, a causal model: one pass gives its exact log-likelihood, where a masked
    # one needs a pass per residue.
    loaded = load_for_inference(model, device, causal=True)
    config = loaded.config
    if config.length_limit is not None:
        limit, reason = config.length_limit[0] - 2, config.length_limit[1]
        for number, record in enumerate(records, start=1):
            if len(record.sequence) > limit:
                raise InputError(
                    f"{fasta}: record {number} ({record.id!r}) has {len(record.sequence)} "
                    f"residues; this model's {reason} read at most {limit}"
                )

    from tqdm import tqdm

    sequences = [encode(record.sequence) for record in records]
    run = dict(tokens_per_batch=tokens_per_batch, device=loaded.device, precision=precision)
    with (
        runtime.float32_matmul_precision(float32_matmul_precision),
        tqdm(unit="pass", desc="score", file=sys.stderr, leave=False) as bar,
    ):

        def progress(_: Pass) -> None:
            bar.update(1)

        score_start = time.perf_counter()
        if rows is None:
            totals = log_likelihoods(loaded.model, sequences, progress=progress, **run)
            header = ["id", "length", "log_likelihood", "mean_log_likelihood", "perplexity"]
            table = []
            for record, total in zip(records, totals, strict=True):
                mean = float(total) / len(record.sequence)
                table.append([record.id, len(record.sequence), float(total), mean, math.exp(-mean)])
            method = "log-likelihood" if config.causal else "pseudo-log-likelihood"
            what = f"{len(records):,} proteins ({sum(map(len, sequences)):,} residues; {method}"
        else:
            columns = mutation_scores(loaded.model, sequences, rows, progress=progress, **run)
            header = ["id", "mutation", *columns]
            table = [
                [row.id, row.text, *(float(values[r]) for values in columns.values())]
                for r, row in enumerate(rows)
            ]
            proteins = len({row.protein for row in rows})
            what = f"{len(rows):,} mutations of {proteins:,} proteins ({', '.join(columns)}"
        seconds = time.perf_counter() - score_start
        passes = bar.n
    write_table(out, header, table, overwrite=overwrite)
    print(
        f"scored {what}: {passes:,} forward passes) with {loaded.describe()} in {seconds:.1f} s "
        f"({passes / max(seconds, 1e-9):,.1f} passes/s; {time.perf_counter() - start:.1f} s "
        "in all)",
        file=sys.stderr,
    )
    print(out)
    return out


def main(argv: list[str]) -> int:
    """``protperf score``: parse ``argv`` and score; returns the exit status."""
    return run_verb(
        score, argv, prog="protperf score", positional=("fasta",), short={"out": "-o"}, threads=True
    )
