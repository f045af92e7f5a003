"""Naive form of Reformer's LSH attention that :mod:`protperf.baselines.lsh` is tested against.

Nothing here is used by the model. The fused op gathers chunks of sorted positions; this form
writes the paper's equations as they read, one row at a time, on dense (H n x H n) matrices
over the n real positions of each hash round (H rounds laid end to end):

    bucket_r(i) = argmax([x_i R_r, -x_i R_r]),   slots sorted by (round, bucket, position)
    chunk(s) = s // bucket_size,   s sees t  iff  chunk(t) in {chunk(s), chunk(s) - 1 mod C}
    score(s, t) = x_s . x_t / (|x_t| sqrt(d)),  -inf where unseen or (causal) later,
                  -5e4 where t is s's own position
    out_i = sum_r softmax_r(lse_r(i)) o_r(i)

Shapes as in :func:`protperf.baselines.lsh.lsh_attention`: qk, v (N, L, d); rotations
(d, H, C); valid (N, L) bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protperf.baselines.lsh import SELF_LOGIT, bucket_counts


def naive_lsh_attention(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    *,
    bucket_size: int,
    causal: bool,
    valid: Tensor | None = None,
) -> Tensor:
    """LSH attention row by row, on dense masks. Returns (N, L, d), zero at padded positions."""
    rows, length, dim = qk.shape
    n_hashes = rotations.shape[1]
    if valid is None:
        valid = torch.ones(rows, length, dtype=torch.bool, device=qk.device)
    out = torch.zeros_like(v)
    for row in range(rows):
        positions = valid[row].nonzero().squeeze(1)  # the real positions, in order
        n = positions.numel()
        if n == 0:
            continue
        x, values = qk[row, positions], v[row, positions]
        half = int(bucket_counts(torch.tensor(n), bucket_size)) // 2
        slots = []  # (round, index into positions) in sorted order
        for r in range(n_hashes):
            rotated = x @ rotations[:, r, :half].to(x.dtype)
            buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
            order = sorted(range(n), key=lambda i, b=buckets: (int(b[i]), i))
            slots += [(r, i) for i in order]
        index = torch.tensor([i for _, i in slots], device=qk.device)
        chunk = torch.arange(len(slots), device=qk.device) // bucket_size
        n_chunks = int(chunk[-1]) + 1
        previous = (chunk - 1) % n_chunks
        sees = (chunk[None, :] == chunk[:, None]) | (chunk[None, :] == previous[:, None])
        queries, keys = x[index], F.normalize(x[index], dim=-1)
        scores = queries @ keys.T * dim**-0.5
        where = positions[index]
        if causal:
            sees &= where[None, :] <= where[:, None]
        scores = scores.masked_fill(~sees, -torch.inf)
        scores = scores.masked_fill(sees & (where[None, :] == where[:, None]), SELF_LOGIT)
        lse = torch.logsumexp(scores, dim=-1)  # (H n,)
        per_slot = torch.softmax(scores, dim=-1) @ values[index]
        rounds_lse = torch.stack([lse[r * n : (r + 1) * n] for r in range(n_hashes)])
        rounds_out = torch.stack([per_slot[r * n : (r + 1) * n] for r in range(n_hashes)])
        # Slots of one round are sorted: put each back at its position before combining.
        unsort = torch.stack([index[r * n : (r + 1) * n].argsort() for r in range(n_hashes)])
        rounds_lse = rounds_lse.gather(1, unsort)
        rounds_out = rounds_out.gather(1, unsort[..., None].expand(-1, -1, dim))
        weights = torch.softmax(rounds_lse, dim=0)[..., None]
        out[row, positions] = (weights * rounds_out).sum(dim=0)
    return out
