"""Does a causal model's prediction depend on the future? Reformer's LSH attention never reads a
later value, but later positions' hashes decide which earlier keys share a chunk with an
earlier query, so the future still moves the past. This measures how much, and whether a
trained model's loss gains from it.

For each of ``--proteins`` test proteins (cropped to the model's max_length) and ``--positions``
positions t drawn at random (seeded) in each:

* the teacher-forced loss at t from one forward pass over the whole protein (what training and
  ``protperf evaluate`` compute), against the loss at t when everything after t, the target
  residue included, is replaced by the residues of another test protein (same length, so the
  same buckets and chunks per round; only the future's content differs). If the model had
  learned to pass the next residue back through its hashes, the real future would lower the
  loss: the paired difference, with its standard error, says whether it does;
* the loss at t from a forward pass over the prefix ``tokens[: t + 1]`` alone, which no later
  token can reach (what one-token decoding would see; for a Reformer the shorter sequence also
  has fewer buckets, so this mixes the leak with a change of hashing);
* how far the logits at t move when the future is swapped (relative L2 change, median over
  positions).

A strictly causal model (FAVOR+, exact attention) gives 0 for both, up to rounding: run it on
one as the control.

    python benchmarks/reformer_leak.py --model runs/table2/uni-reformer --data runs/table2/data
    python benchmarks/reformer_leak.py --model runs/table2/uni-transformer --data runs/table2/data
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def measure(model, proteins: list, positions: int, seed: int) -> dict:
    """The paired losses and logit moves over ``proteins`` ((L,) int64 token tensors)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    whole, swapped, prefix, moves = [], [], [], []
    with torch.no_grad():
        for i, tokens in enumerate(proteins):
            logits = model(tokens[None])["logits"][0].float()
            picks = torch.randperm(len(tokens) - 1, generator=generator)[:positions]
            donor = proteins[
                (i + 1 + int(torch.randint(len(proteins) - 1, (1,), generator=generator)))
                % len(proteins)
            ]
            for t in picks.tolist():
                target = tokens[t + 1]
                whole.append(F.cross_entropy(logits[t], target).item())
                changed = tokens.clone()
                future = len(tokens) - t - 1
                changed[t + 1 :] = donor[1:-1].repeat(future // max(len(donor) - 2, 1) + 1)[:future]
                moved = model(changed[None])["logits"][0, t].float()
                swapped.append(F.cross_entropy(moved, target).item())
                moves.append(((moved - logits[t]).norm() / logits[t].norm()).item())
                alone = model(tokens[None, : t + 1])["logits"][0, t].float()
                prefix.append(F.cross_entropy(alone, target).item())

    def paired(a: list[float], b: list[float]) -> tuple[float, float]:
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
        return mean, sd / math.sqrt(len(diffs))

    return {
        "positions": len(whole),
        "loss_whole": sum(whole) / len(whole),
        "loss_swapped": sum(swapped) / len(swapped),
        "loss_prefix": sum(prefix) / len(prefix),
        "vs_swapped": paired(whole, swapped),
        "vs_prefix": paired(whole, prefix),
        "median_logit_move": sorted(moves)[len(moves) // 2],
        "moved_fraction": sum(m > 1e-4 for m in moves) / len(moves),
    }


def test_proteins(data: Path, count: int, max_length: int, seed: int) -> list:
    """``count`` test proteins drawn at random (seeded), <bos> ... <eos>, cropped to max_length."""
    import h5py
    import numpy as np
    import torch

    from protperf.tokenizer import BOS, EOS

    with h5py.File(data / "test.h5") as f:
        offsets, tokens = f["offsets"][:], f["tokens"]
        picks = np.random.default_rng(seed).choice(len(offsets) - 1, size=count, replace=False)
        proteins = []
        for i in sorted(picks.tolist()):
            residues = tokens[offsets[i] : offsets[i + 1]].astype(np.int64)
            full = np.concatenate([[BOS], residues, [EOS]])[:max_length]
            proteins.append(torch.from_numpy(full))
    return proteins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a causal run, export or packaged name")
    parser.add_argument("--data", type=Path, required=True, help="a prepare-data folder")
    parser.add_argument("--proteins", type=int, default=100)
    parser.add_argument("--positions", type=int, default=10, help="positions per protein")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from protperf import load_model

    torch.set_num_threads(1)
    model = load_model(args.model)
    if not model.config.causal:
        print(f"{args.model} is not a causal model", file=sys.stderr)
        return 1
    proteins = test_proteins(args.data, args.proteins, model.config.max_length, args.seed)
    result = measure(model, proteins, args.positions, args.seed)
    print(f"model: {args.model} ({model.config.kernel}); {result['positions']} positions in "
          f"{len(proteins)} test proteins of {args.data}")  # fmt: skip
    print(
        "| loss, whole protein | future swapped | whole - swapped (± s.e.) | prefix alone | "
        "whole - prefix (± s.e.) | logits moved by the swap (median) | positions moved |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    (swap, swap_se), (pre, pre_se) = result["vs_swapped"], result["vs_prefix"]
    print(
        f"| {result['loss_whole']:.4f} | {result['loss_swapped']:.4f} | {swap:+.4f} ± "
        f"{swap_se:.4f} | {result['loss_prefix']:.4f} | {pre:+.4f} ± {pre_se:.4f} | "
        f"{result['median_logit_move']:.2e} | {100 * result['moved_fraction']:.0f}% |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
