"""`protperf score`: does the model prefer real proteins, and how fast does it score them.

1. Real against shuffled: each protein of a held-out proteome (by default *S. cerevisiae*, which
   the packaged model never saw) against a copy of itself with its residues shuffled (seeded),
   both scored by the model given with ``--model``. A shuffled copy keeps the composition, so
   only what the model learned beyond it can tell them apart. Reported: the fraction of pairs in
   which the real protein has the higher per-residue log-likelihood (target: at least 95%), and
   the unpaired AUROC of the per-residue log-likelihood over all real and shuffled proteins.
   The peer: the proteome's own residue frequencies (a unigram model), which score a protein and
   its shuffled copy alike.
2. Speed, proteins/s at 1k, 8k and 32k residues (random proteins), FAVOR+ against exact
   attention: models of the ``--model``'s shape with random weights (which cost what trained
   ones do), the causal log-likelihood (one forward pass) and the masked pseudo-log-likelihood
   (L passes of L tokens, batched by ``protperf score``'s token budget). A full
   pseudo-log-likelihood at 8k or 32k takes hours on a CPU, so each measurement runs passes
   for at most ``--budget`` seconds (at least one batch) and the table says how many of the L
   passes it timed; the rate is extrapolated from them (every pass of a protein costs the same).

    python benchmarks/score.py                                   # the table in docs/scoring.md
    python benchmarks/score.py --model runs/tiny-cpu-uni --count 100 --lengths 1024 8192
    python benchmarks/score.py --threads 1   # on a CPU that other work keeps busy

On a busy CPU, intra-op threads wait for a descheduled peer at every operation: on 2 shared
cores, two threads scored a 1k-residue protein 20x slower than one.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

SHARED_PROTEOMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteomes"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def held_out_proteins(path: Path, count: int, max_length: int) -> list[str]:
    """The first ``count`` proteins of ``path`` with at most ``max_length`` residues."""
    from protperf.fasta import read_fasta

    records, _ = read_fasta(path, skip_invalid=True)
    return [r.sequence for r in records if len(r.sequence) <= max_length][:count]


def shuffled(sequence: str, seed: int) -> str:
    import numpy as np

    letters = np.array(list(sequence))
    return "".join(np.random.default_rng(seed).permutation(letters))


def unigram_means(sequences: list[str], reference: list[str]) -> list[float]:
    """Per-residue log-likelihood under the residue frequencies of ``reference``."""
    from collections import Counter

    counts = Counter("".join(reference))
    total = sum(counts.values())
    log_p = {aa: math.log(n / total) for aa, n in counts.items()}
    floor = math.log(0.5 / total)  # a letter never seen in the reference
    # Sum over sorted letter counts: a protein and its shuffled copy get the same float.
    return [
        sum(n * log_p.get(aa, floor) for aa, n in sorted(Counter(s).items())) / len(s)
        for s in sequences
    ]


def real_against_shuffled(real: list[float], fake: list[float]) -> tuple[float, float, float]:
    """(fraction of pairs real > shuffled, fraction tied, unpaired AUROC real vs shuffled)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    wins = sum(r > f for r, f in zip(real, fake, strict=True)) / len(real)
    ties = sum(r == f for r, f in zip(real, fake, strict=True)) / len(real)
    scores = torch.tensor(real + fake, dtype=torch.float64)
    labels = torch.tensor([1] * len(real) + [0] * len(fake))
    return wins, ties, float(binary_auroc(scores, labels))


def random_protein(length: int, seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(AMINO_ACIDS), size=length))


def shaped_model(config, *, kernel: str, causal: bool):
    """A model of ``config``'s shape with ``kernel`` and direction; random weights (seed 0)."""
    import torch

    from protperf.model import PerformerLM

    torch.manual_seed(0)
    shape = replace(config, kernel=kernel, causal=causal, dropout=0.0, positions="rotary")
    return PerformerLM(shape).eval()


def proteins_per_second(model, length: int, budget: float, tokens_per_batch: int):
    """(proteins/s, passes timed, passes a protein needs) of scoring one random protein."""
    from protperf.score import Pass, log_likelihoods, pass_log_probs
    from protperf.tokenizer import encode

    sequences = [encode(random_protein(length, seed=length))]
    warm = [encode(random_protein(64, seed=1))]
    log_likelihoods(model, warm, tokens_per_batch=tokens_per_batch)  # thread pools, allocator
    if model.config.causal:  # the median of up to 3 forward passes within the budget
        times: list[float] = []
        while len(times) < 3 and (not times or sum(times) < budget):
            start = time.perf_counter()
            log_likelihoods(model, sequences, tokens_per_batch=tokens_per_batch)
            times.append(time.perf_counter() - start)
        return 1.0 / statistics.median(times), len(times), 1
    passes = [Pass(0, (i,), (i,)) for i in range(length)]
    done = 0
    start = time.perf_counter()
    for _ in pass_log_probs(model, sequences, passes, tokens_per_batch=tokens_per_batch):
        done += 1
        elapsed = time.perf_counter() - start
        # Stop at a batch's end: the passes of a batch come out together.
        per_batch = max(1, tokens_per_batch // (length + 2))
        if elapsed > budget and done % per_batch == 0:
            break
    elapsed = time.perf_counter() - start
    return done / elapsed / length, done, length


def duration(seconds: float) -> str:
    """3.2 ms, 290 ms, 4.1 s, 12 min, 6.8 h, 234 h."""
    unit, size = next(
        ((unit, size) for unit, size in (("h", 3600), ("min", 60), ("s", 1)) if seconds >= size),
        ("ms", 1e-3),
    )
    value = seconds / size
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.2g} {unit}"


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def shuffled_part(loaded, args: argparse.Namespace) -> None:
    """Part 1: real proteins against their shuffled copies; prints its table."""
    from protperf.score import log_likelihoods
    from protperf.tokenizer import encode

    real = held_out_proteins(args.proteome, args.count, args.max_length)
    fake = [shuffled(s, args.seed + i) for i, s in enumerate(real)]
    lengths = [len(s) for s in real]
    start = time.perf_counter()
    totals = log_likelihoods(
        loaded.model, [encode(s) for s in real + fake], tokens_per_batch=args.tokens_per_batch
    )
    seconds = time.perf_counter() - start
    means = [float(t) / len(s) for t, s in zip(totals, real + fake, strict=True)]
    method = "log-likelihood" if loaded.config.causal else "pseudo-log-likelihood"
    print(f"real against shuffled: the first {len(real)} proteins of {args.proteome.name} of at "
          f"most {args.max_length} residues ({sum(lengths):,} residues, median "
          f"{sorted(lengths)[len(lengths) // 2]}), each with a shuffled copy; {method} of all "
          f"{2 * len(real)} in {seconds:.1f} s\n")  # fmt: skip
    rows = [("scorer", "real > shuffled (pairs)", "ties", "AUROC (unpaired)",
             "mean log-lik. real", "shuffled")]  # fmt: skip
    n = len(real)
    unigram = unigram_means(real + fake, real)
    for name, scores in (
        (f"{args.model} ({method})", means),
        ("unigram (residue frequencies)", unigram),
    ):
        wins, ties, auroc = real_against_shuffled(scores[:n], scores[n:])
        rows.append((name, f"{100 * wins:.1f}%", f"{100 * ties:.1f}%", f"{auroc:.3f}",
                     f"{sum(scores[:n]) / n:.3f}", f"{sum(scores[n:]) / n:.3f}"))  # fmt: skip
    print(table(rows) + "\n")


def speed_part(config, args: argparse.Namespace) -> None:
    """Part 2: proteins/s, FAVOR+ against exact attention, ``config``'s shape; prints its table."""
    print(f"speed: proteins/s, one random protein per length; {config.depth} layers, "
          f"d {config.dim}, {config.heads} heads, m {config.num_features}; pseudo-log-likelihood "
          f"passes timed for at most {args.budget:g} s, batched by {args.tokens_per_batch:,} "
          "tokens\n")  # fmt: skip
    rows = [("scoring", "L", "FAVOR+", "exact", "FAVOR+ / exact", "per protein (FAVOR+ / exact)",
             "passes timed (FAVOR+ / exact)")]  # fmt: skip
    for causal in (True, False):
        for length in args.lengths:
            rates = {}
            for kernel in ("softmax", "exact"):
                model = shaped_model(config, kernel=kernel, causal=causal)
                rates[kernel] = proteins_per_second(
                    model, length, args.budget, args.tokens_per_batch
                )
                del model
            (favor, favor_done, needed), (exact, exact_done, _) = rates["softmax"], rates["exact"]
            label = "causal log-likelihood" if causal else "masked pseudo-log-likelihood"
            timed = (
                f"all (median of {favor_done} / {exact_done} runs)"
                if causal
                else f"{favor_done:,} / {exact_done:,} of {needed:,}"
            )
            each = f"{duration(1 / favor)} / {duration(1 / exact)}"
            rows.append((label, f"{length:,}", f"{favor:.3g}", f"{exact:.3g}",
                         f"{favor / exact:.2f}x", each, timed))  # fmt: skip
            print(f"  {label} at {length:,}: FAVOR+ {favor:.3g}/s, exact {exact:.3g}/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="performer-small-uni",
        help="packaged name, run, export or .ckpt (default: performer-small-uni)",
    )
    parser.add_argument(
        "--proteome", type=Path, default=SHARED_PROTEOMES / "UP000002311-S.cerevisiae.fasta.gz"
    )
    parser.add_argument("--count", type=int, default=300, help="proteins scored, real + shuffled")
    parser.add_argument("--max-length", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="of the shuffles")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument(
        "--budget",
        type=float,
        default=8.0,
        help="seconds of pseudo-log-likelihood passes per measurement",
    )
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["shuffled", "speed"],
        default=["shuffled", "speed"],
        help="which parts to run (default: both)",
    )
    args = parser.parse_args(argv)

    from protperf.runtime import tune_process

    tune_process()  # as the protperf command does, before torch is imported
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from protperf.inference import load_for_inference

    if not args.proteome.exists():
        print(f"proteome not found: {args.proteome} (see ../shared/data)", file=sys.stderr)
        return 1
    loaded = load_for_inference(args.model)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"model: {args.model}: {loaded.describe()}\n")

    if "shuffled" in args.parts:
        shuffled_part(loaded, args)
    if "speed" in args.parts:
        speed_part(loaded.config, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
