"""Linformer attention (Wang et al. 2020): keys and values projected along the length.

softmax(Q (E^T K)^T / sqrt(d)) (F^T V), with E, F learned (n x k) matrices: every query attends
to k mixtures of positions instead of L positions, O(L k) in time and memory. E and F are
shared by the heads of a layer (the paper's headwise sharing, the ``linformer`` package's
default). A sequence shorter than n uses the first rows of E and F, and padded keys and values
are zeroed first, so a sequence's output does not depend on its batch's padding. There is no
causal form: each projected key and value mixes every position, the future included.

Shapes: q, k, v (B, H, L, d); E, F (n, k) with L <= n; ``valid`` (B, L) bool, True at real
positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["init_projection", "linformer_attention"]


def init_projection(projection: Tensor) -> Tensor:
    """Fill an (n, k) projection in place, uniform in +-1/sqrt(k) (the ``linformer`` package)."""
    bound = 1.0 / math.sqrt(projection.shape[-1])
    with torch.no_grad():
        return projection.uniform_(-bound, bound)


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj_k: Tensor,
    proj_v: Tensor,
    valid: Tensor | None = None,
) -> Tensor:
    """Attend through the length projections. Returns (B, H, L, d) in v's dtype."""
    length = k.shape[-2]
    if length > proj_k.shape[0]:
        raise ValueError(
            f"length {length} exceeds the Linformer projections' {proj_k.shape[0]} positions"
        )
    if valid is not None:
        keep = valid[:, None, :, None]
        k, v = k * keep, v * keep
    e, f = proj_k[:length].to(k.dtype), proj_v[:length].to(v.dtype)
    keys = torch.einsum("bhld,lk->bhkd", k, e)
    values = torch.einsum("bhld,lk->bhkd", v, f)
    scores = torch.einsum("bhld,bhkd->bhlk", q, keys) * q.shape[-1] ** -0.5
    return torch.einsum("bhlk,bhkd->bhld", scores.softmax(dim=-1), values)
