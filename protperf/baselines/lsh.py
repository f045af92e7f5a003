"""Reformer's LSH attention (Kitaev et al. 2020), as an op over rows of (length, head_dim).

The published algorithm, with reformer-pytorch's defaults where the paper leaves a choice:

1. Shared query/key: one vector per position is both the query and, normalised to unit length,
   the key (so that a query's own key is the most similar one, hence rule 5).
2. Hashing: random rotations R (d x n_buckets/2) per round; a position's bucket is
   argmax([x R, -x R]). ``n_hashes`` rounds use independent rotations.
3. Sorting: per round, positions sorted by (bucket, position); the rounds are laid end to end.
4. Chunks: the sorted positions are cut into chunks of ``bucket_size``; each chunk attends to
   itself and to the chunk before it (the first chunk to the last, cyclically). Positions in
   different buckets of one chunk see each other, and a pair met in several rounds counts once
   per round (reformer-pytorch's ``attend_across_buckets`` and ``allow_duplicate_attention``).
5. A position attends to itself only when nothing else is there (its logit is -5e4, not -inf);
   a causal query never sees a later position.
6. The rounds' outputs are combined by the softmax of their log-sum-exps.

Lengths: the bucket count follows each row's own number of real positions, n_buckets =
2 ceil(n / (2 bucket_size)) (reformer-pytorch's ``L / bucket_size`` when L is a multiple of
2 bucket_size), and padded positions sort after every real one and are never attended to, so a
row's output does not depend on how much padding its batch adds.

Shapes: N rows (batch x heads), L length, d head_dim, H = n_hashes. ``rotations`` is
(d, H, C) with C >= the largest n_buckets / 2: a row with fewer buckets uses its first columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protperf.seeds import derive_seed

#: Logit of a position's own key: below any real score, above a masked one (reformer-pytorch's
#: value, safe in half precision).
SELF_LOGIT = -5e4
#: Rotation columns are drawn in blocks of this many, each from its own seed, so that a longer
#: sequence extends the rotations a shorter one used instead of redrawing them.
ROTATION_BLOCK = 32
#: Positions hashed at once: the rotated vectors (N, H, block, C) stay bounded at any length.
HASH_BLOCK = 4096

__all__ = ["ROTATION_BLOCK", "SELF_LOGIT", "bucket_counts", "draw_rotations", "lsh_attention"]


def bucket_counts(lengths: Tensor, bucket_size: int) -> Tensor:
    """Buckets of each row: 2 ceil(n / (2 bucket_size)), at least 2. lengths (N,) -> (N,)."""
    pairs = torch.div(lengths + 2 * bucket_size - 1, 2 * bucket_size, rounding_mode="floor")
    return 2 * pairs.clamp(min=1)


def draw_rotations(head_dim: int, n_hashes: int, columns: int, seed: int) -> Tensor:
    """Gaussian rotations (head_dim, n_hashes, columns'), columns' >= columns a multiple of
    :data:`ROTATION_BLOCK`; block b is drawn from ``derive_seed(seed, b)`` alone."""
    blocks = []
    for block in range(-(-max(columns, 1) // ROTATION_BLOCK)):
        generator = torch.Generator().manual_seed(derive_seed(seed, block))
        blocks.append(torch.randn(head_dim, n_hashes, ROTATION_BLOCK, generator=generator))
    return torch.cat(blocks, dim=-1)


@torch.no_grad()
def _hash(qk: Tensor, rotations: Tensor, half: Tensor) -> Tensor:
    """Buckets (N, H, L) in [0, 2 half) of each row's positions; half (N,) = n_buckets / 2."""
    columns = int(half.max())
    rotations = rotations[..., :columns].to(qk.dtype)
    unused = torch.arange(columns, device=qk.device)[None, :] >= half[:, None]  # (N, C)
    unused = unused[:, None, None, :]
    buckets = []
    for start in range(0, qk.shape[1], HASH_BLOCK):
        rotated = torch.einsum("nld,dhc->nhlc", qk[:, start : start + HASH_BLOCK], rotations)
        both = torch.cat(
            [rotated.masked_fill(unused, -torch.inf), (-rotated).masked_fill(unused, -torch.inf)],
            dim=-1,
        )
        index = both.argmax(dim=-1)  # [0, C): +xR, [C, 2C): -xR
        # The second half continues after the row's own half, as if C were the row's.
        second = index >= columns
        buckets.append(torch.where(second, index - columns + half[:, None, None], index))
    return torch.cat(buckets, dim=2)


class _SoftmaxLogSumExp(torch.autograd.Function):
    """(softmax, log-sum-exp) of scores (..., n) -> (..., n), (..., 1), in one pass of exp.

    The log-sum-exp is the top score minus the log of its probability (at least 1/n, so no
    underflow). Its gradient is the softmax, added to the softmax's own backward in place.
    """

    @staticmethod
    def forward(ctx, scores: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(scores, dim=-1)
        top = scores.argmax(dim=-1, keepdim=True)
        log_norm = scores.gather(-1, top) - probs.gather(-1, top).log()
        ctx.save_for_backward(probs)
        return probs, log_norm

    @staticmethod
    def backward(ctx, grad_probs: Tensor, grad_log_norm: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        # The fused kernel of torch.softmax's own backward: probs * (g - sum(g * probs)).
        grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        return grad.addcmul_(probs, grad_log_norm)


def _look_back(chunks: Tensor, real_chunks: Tensor) -> Tensor:
    """Each chunk beside the one before it: (N, K, c, ...) -> (N, K, 2c, ...). A row's first
    chunk is beside its last chunk of real positions, ``real_chunks`` (N,) - 1."""
    last = chunks[torch.arange(chunks.shape[0], device=chunks.device), real_chunks - 1]
    before = torch.cat([last[:, None], chunks[:, :-1]], dim=1)
    return torch.cat([chunks, before], dim=2)


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    *,
    bucket_size: int,
    causal: bool,
    valid: Tensor | None = None,
) -> Tensor:
    """LSH attention over rows. qk, v: (N, L, d); valid: (N, L) bool, True at real positions.

    Returns (N, L, d); a padded position's output is meaningless (the caller zeroes it).
    """
    rows, length, dim = qk.shape
    n_hashes = rotations.shape[1]
    device = qk.device
    if valid is None:
        valid = torch.ones(rows, length, dtype=torch.bool, device=device)
    lengths = valid.sum(dim=1)
    half = bucket_counts(lengths, bucket_size) // 2
    if int(half.max()) > rotations.shape[-1]:
        raise ValueError(f"{int(half.max())} rotation columns needed, {rotations.shape[-1]} given")
    buckets = _hash(qk.detach(), rotations, half)  # (N, H, L)

    # Sort keys: round, bucket, position for real positions; every padded one after them all.
    most = 2 * rotations.shape[-1]
    position = torch.arange(length, device=device)
    rounds = torch.arange(n_hashes, device=device)[None, :, None]
    real_key = (rounds * most + buckets) * length + position
    pad_key = (n_hashes * most + rounds) * length + position
    keys = torch.where(valid[:, None, :], real_key, pad_key).view(rows, n_hashes * length)
    order = keys.argsort(dim=1)  # (N, H L): the sorted slot's index into the rounds laid end to end

    total = n_hashes * length
    padded_total = -(-total // bucket_size) * bucket_size
    slot_position = order % length
    slot_valid = valid.gather(1, slot_position)
    if padded_total > total:  # a last partial chunk, filled with positions that are never seen
        extra = padded_total - total
        slot_position = F.pad(slot_position, (0, extra))
        slot_valid = F.pad(slot_valid, (0, extra), value=False)
    index = slot_position[..., None].expand(-1, -1, dim)
    sorted_qk, sorted_v = qk.gather(1, index), v.gather(1, index)

    n_chunks = padded_total // bucket_size
    chunk = (rows, n_chunks, bucket_size)
    queries = sorted_qk.view(*chunk, dim)
    keys_ = F.normalize(queries, p=2.0, dim=-1)
    queries = queries * dim**-0.5  # scaled here, on (N, K, c, d), not on the scores
    # The chunk before each one; a row's first chunk looks back at its last chunk of real
    # positions (cyclically, as reformer-pytorch), and a row with one such chunk at nothing.
    real_chunks = (-(-(n_hashes * lengths) // bucket_size)).clamp(min=1)  # (N,)
    keys_ = _look_back(keys_, real_chunks)
    values = _look_back(sorted_v.view(*chunk, dim), real_chunks)
    scores = torch.einsum("nkid,nkjd->nkij", queries, keys_)  # (N, K, c, 2c)
    with torch.no_grad():
        query_position = slot_position.view(chunk)
        key_position = _look_back(query_position, real_chunks)
        key_valid = _look_back(slot_valid.view(chunk), real_chunks)
        # A row with one chunk of real positions looks back at that chunk: not twice.
        key_valid[:, 0, bucket_size:] &= (real_chunks > 1)[:, None]
        blocked = ~key_valid[:, :, None, :]
        if causal:
            blocked = blocked | (key_position[:, :, None, :] > query_position[..., None])
        own = (key_position[:, :, None, :] == query_position[..., None]) & ~blocked
    scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min).masked_fill(own, SELF_LOGIT)
    probs, log_norm = _SoftmaxLogSumExp.apply(scores)
    out = torch.einsum("nkij,nkjd->nkid", probs, values)

    # Back to the rounds laid end to end, then each position's rounds weighted by their mass.
    inverse = torch.empty_like(order)
    inverse.scatter_(1, order, torch.arange(total, device=device).expand(rows, -1))
    out = out.reshape(rows, padded_total, dim).gather(1, inverse[..., None].expand(-1, -1, dim))
    log_norm = log_norm.reshape(rows, padded_total).gather(1, inverse)
    weights = torch.softmax(log_norm.view(rows, n_hashes, length), dim=1)
    return (out.view(rows, n_hashes, length, dim) * weights[..., None]).sum(dim=1)
