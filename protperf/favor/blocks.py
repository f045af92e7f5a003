"""What both FAVOR+ kernels share: the [v, 1] values, the normalisation and its gradient, and the
memory budgets that cut a call into blocks of rows and a long row into position segments.

Shapes: N = batch * heads rows of length L, d the head size, m the number of features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: On a CPU, glibc serves a block of 32 MB or more with a fresh mmap (page-faulted anew on every
#: use) whatever the settings; rows go in blocks whose L x m tensors stay strictly under that, so
#: that the allocator recycles them (see protperf.runtime). A row larger than the budget is a
#: block of its own.
BLOCK_BYTES = {"cpu": 31 << 20, "cuda": 1 << 30}
#: Budget for the features of all rows of one call (two L x m tensors per row): within it they
#: are kept for the backward; beyond it the backward recomputes them block by block.
KEEP_FEATURES_BYTES = {"cpu": 512 << 20, "cuda": 2 << 30}


def _values_with_ones(v: Tensor) -> Tensor:
    """V~ = [v, 1]: (N, L, d) -> (N, L, d+1); the last output column is then the normaliser."""
    return torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)


def _normalise(out: Tensor) -> tuple[Tensor, Tensor]:
    """Split (N, L, d+1) into the result (N, L, d) and the normaliser (N, L, 1).

    A query with no valid key at all (causal attention at left padding) has a zero normaliser:
    its result is 0 and passes no gradient (the normaliser becomes +inf).
    """
    denominator = out[..., -1:]
    denominator = denominator.masked_fill(denominator == 0, math.inf)  # a copy: `out` can go
    return out[..., :-1] / denominator, denominator


def _output_gradient(grad: Tensor, normalised: Tensor, denominator: Tensor) -> Tensor:
    """Gradient w.r.t. the unnormalised output [numerator, normaliser]: (N, L, d+1)."""
    grad_num = grad / denominator
    grad_den = -(grad_num * normalised).sum(dim=-1, keepdim=True)
    return torch.cat([grad_num, grad_den], dim=-1)


def _row_blocks(
    rows: int, length: int, num_features: int, device: torch.device
) -> tuple[list[slice], bool]:
    """Blocks of rows processed together, and whether their features are kept for the backward.

    As few blocks as the budget allows, of balanced sizes: 8 rows of 4 MB under a 31 MB budget
    make two blocks of 4 rows, not 7 + 1.
    """
    per_row = 4 * length * num_features  # one L x m float32 tensor
    keep = 2 * rows * per_row <= KEEP_FEATURES_BYTES.get(device.type, KEEP_FEATURES_BYTES["cpu"])
    return _balanced_slices(rows, per_row, device), keep


def _balanced_slices(total: int, item_bytes: int, device: torch.device) -> list[slice]:
    """``range(total)`` in as few slices as keep ``item_bytes`` each under BLOCK_BYTES, of
    balanced sizes (one item per slice when a single item exceeds it)."""
    most = max(1, BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"]) // item_bytes)
    count = -(-total // most)
    size = -(-total // count)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _segments(length: int, rows: int, num_features: int, device: torch.device) -> list[slice]:
    """Position segments of a block of rows: one, unless one row's L x m features exceed the
    block budget (L = 32,768 at m = 256), then as few balanced segments as keep them under it."""
    return _balanced_slices(length, 4 * rows * num_features, device)
