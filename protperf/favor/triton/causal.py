"""Causal FAVOR+ in Triton: the chunked prefix state, its normaliser and the hand-written
backward, with the features recomputed wherever they are needed and never stored.

The PyTorch reference beside this is :mod:`protperf.favor.causal` (the same out_i, and the
one-token recurrence :func:`~protperf.favor.causal.causal_step`, whose DecodeState is the state
below at the running max). Notation per row (N = batch * heads rows), positions in chunks of BT:

    out_i = y_i[:d] / y_i[d],   y_i = sum_{j <= i} (Q''_i . K''_j) V~_j,   V~ = [v, 1]
    K''_j as query i sees it = Ê_j exp(g_j - M_i) + eps * valid_j,   M_i = max(FLOOR, g_<=i)

For chunk c with positions i: Mp = M entering the chunk, Mc = M at its end,
    H_c = sum_{j before c} Ê_j exp(g_j - Mp) V~_j^T   (m x (d+1): H and its last column z)
    P_c = sum_{j before c} valid_j V~_j                  ((d+1): P and the count)
    y_i = exp(Mp - M_i) Q''_i H_c + eps qsum_i P_c + sum_{j in c, j <= i} A_ij V~_j,
    A_ij = (Q''_i . Ê_j) exp(g_j - M_i) + eps qsum_i valid_j     (qsum_i = sum_f Q''_if).
Every exponent is <= 0. Query i reads only keys j <= i and maxima of the past, and the masks
are ``tl.where`` selections, never products with 0: its output is bit for bit the same
whatever the later keys and values are.

Kernels (grid; what each recomputes):
    _stats_kernel (features.py)   (chunks, N)           the per-position maxima and sums
    _states_kernel                (N, m/BK x V_SPLIT,   H_c, z_c, P_c per chunk, sequential
                                   1 or 2)              over chunks; in the backward also the
                                                        reverse scan of their gradients G_c
    _output_kernel                (chunks, N)           y, out = y[:d] / y[d]; Q'', Ê again
    _dq_kernel, _dkv_kernel       (chunks, N)           dq; dk and dv; Q'', Ê again
Forward: 3 launches; backward: 3 (the states again, beside the gradient scan, then dq, dk/dv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from protperf.favor.triton.features import (
    DEFAULT_CHUNK,
    FLOOR,
    TUNE_KEY,
    Problem,
    _dot,
    _dot_acc,
    _feature_grad,
    _key_features,
    _load_tile,
    _project,
    _query_features,
    _row_base,
    _running_max,
    _stabilised,
    _unproject,
    _valid,
    autotune,
    feature_stats,
    last_dim_contiguous,
    on_input_device,
    strides,
)


def _state_configs() -> list[triton.Config]:
    # The scan is sequential over chunks, so its parallelism is N x m/BK x V_SPLIT programs:
    # splitting the d value columns in two doubles it (and the key projection) where the rows
    # are few. Three stages let the next chunk's k, v loads fly while this chunk's products run.
    return [
        triton.Config({"V_SPLIT": 1}, num_warps=4, num_stages=3),
        triton.Config({"V_SPLIT": 1}, num_warps=8, num_stages=2),
        triton.Config({"V_SPLIT": 2}, num_warps=4, num_stages=3),
    ]


def _prune_value_splits(configs, named_args, **kwargs):
    """Drop the configurations whose value tile would be under 16 columns (tl.dot's least)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [c for c in configs if block_d // c.kwargs["V_SPLIT"] >= 16]
    return kept or configs[:1]


def _chunk_configs() -> list[triton.Config]:
    # Per-chunk kernels keep several 64 x 64 float32 tiles live across the feature loop: 8 warps
    # halve the registers per thread that they take.
    return [
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=2),
    ]


@autotune(
    _state_configs(),
    key=[*TUNE_KEY, "DIRECTIONS", "WRITE_EXTRAS"],
    prune_configs_by={"early_config_prune": _prune_value_splits},
)
@triton.jit
def _states_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, stats_ptr, block_max_ptr,
    do_ptr, o_ptr, den_ptr, chunk_max_ptr,
    h_ptr, z_ptr, p_ptr, count_ptr, gh_ptr, gz_ptr, gp_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol, spb,
    heads, length, d, m, chunks, eps,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, V_SPLIT: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DIRECTIONS: tl.constexpr,
    WRITE_EXTRAS: tl.constexpr,
):  # fmt: skip
    """Grid (N, BLOCK_M/BK * V_SPLIT, DIRECTIONS): one (BK x BV) slice of one row's state,
    BV = BLOCK_D / V_SPLIT.

    Direction 0 scans the chunks forward and stores the state entering each: H (N, n, BLOCK_M,
    BLOCK_D) and z (N, n, BLOCK_M) at the scale exp(-Mp); with WRITE_EXTRAS (the forward pass)
    also P (N, n, BLOCK_D), count (N, n) and chunk_max (N, n) = Mc. Direction 1 (backward only)
    scans them in reverse for G_c, the gradient of the state leaving chunk c at the scale
    exp(-Mc), as (gh, gz), and the gradient of P leaving it as gp (that of the count, the
    ones column's, reaches nothing):
        G_{c-1} = exp(Mp_c - Mc_c) G_c + sum_{i in c} exp(Mp_c - M_i) Q''_i dy_i^T.
    """
    BV: tl.constexpr = BLOCK_D // V_SPLIT
    row = tl.program_id(0)
    f_tile = tl.program_id(1) // V_SPLIT
    v_tile = tl.program_id(1) % V_SPLIT
    offs_t = tl.arange(0, BT)
    offs_f = f_tile * BK + tl.arange(0, BK)
    offs_v = v_tile * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BLOCK_D)
    features = offs_f < m
    size = tl.num_programs(0).to(tl.int64) * length  # one (N, L) plane of stats
    row64 = row.to(tl.int64)
    first_f = f_tile == 0
    first_v = v_tile == 0
    # The vector forms of first_f and first_v, in integer arithmetic (a scalar and a vector
    # condition combined are not a mask that Triton's interpreter takes).
    only_first_v = offs_f + v_tile * BLOCK_M < BLOCK_M
    only_first_f = offs_v + f_tile * BLOCK_D < BLOCK_D
    if tl.program_id(2) == 0:
        k_base = _row_base(k_ptr, row, heads, skb, skh)
        v_base = _row_base(v_ptr, row, heads, svb, svh)
        h = tl.zeros([BK, BV], tl.float32)
        z = tl.zeros([BK], tl.float32)
        p = tl.zeros([BV], tl.float32)
        count = tl.sum(tl.zeros([BT], tl.float32), axis=0)
        previous = tl.max(tl.full([BT], FLOOR, tl.float32), axis=0)
        for c in range(0, chunks):
            slot = row64 * chunks + c
            tl.store(h_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_v[None, :], h)
            tl.store(z_ptr + slot * BLOCK_M + offs_f, z, mask=only_first_v)
            if WRITE_EXTRAS:
                tl.store(p_ptr + slot * BLOCK_D + offs_v, p, mask=only_first_f)
                tl.store(count_ptr + slot, count, mask=first_f & first_v)
            offs_l = c * BT + offs_t
            valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
            k = _load_tile(k_base, offs_l, skl, offs_d, d, valid)
            v = _load_tile(v_base, offs_l, svl, offs_v, d, valid)
            kl = _project(k, w_ptr, f_tile * BK, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            keep = valid[:, None] & features[None, :]
            if SOFTMAX:
                kmax = tl.load(
                    stats_ptr + 2 * size + row64 * length + offs_l, mask=valid, other=0.0
                )
                g = tl.load(
                    stats_ptr + 3 * size + row64 * length + offs_l, mask=valid, other=float("-inf")
                )
                current = tl.maximum(previous, tl.load(block_max_ptr + slot))
                if WRITE_EXTRAS:
                    tl.store(chunk_max_ptr + slot, current, mask=first_f & first_v)
                # K^ = Ê exp(g - Mc): the chunk's keys at the scale of its end.
                scaled = _key_features(kl, kmax, keep, SOFTMAX) * tl.exp(g - current)[:, None]
                rescale = tl.exp(previous - current)
                h = _dot_acc(tl.trans(scaled), v, h * rescale, PRECISION)
                z = z * rescale + tl.sum(scaled, axis=0)
                previous = current
            else:
                keys = _key_features(kl, kl, keep, SOFTMAX)
                h = _dot_acc(tl.trans(keys), v, h, PRECISION)
                z += tl.sum(keys, axis=0)
            ones = valid.to(tl.float32)
            p += tl.sum(v * ones[:, None], axis=0)
            count += tl.sum(ones, axis=0)
    else:
        q_base = _row_base(q_ptr, row, heads, sqb, sqh)
        do_base = _row_base(do_ptr, row, heads, sdb, sdh)
        o_base = _row_base(o_ptr, row, heads, sob, soh)
        gh = tl.zeros([BK, BV], tl.float32)
        gz = tl.zeros([BK], tl.float32)
        gp = tl.zeros([BV], tl.float32)
        for step in range(0, chunks):
            c = chunks - 1 - step
            slot = row64 * chunks + c
            tl.store(gh_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_v[None, :], gh)
            tl.store(gz_ptr + slot * BLOCK_M + offs_f, gz, mask=only_first_v)
            tl.store(gp_ptr + slot * BLOCK_D + offs_v, gp, mask=only_first_f)
            offs_l = c * BT + offs_t
            valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
            dy, dy_den = _output_grad(do_base, o_base, den_ptr + row64 * length, offs_l, sdl, sol,
                                      offs_v, offs_d, d, valid)  # fmt: skip
            q = _load_tile(q_base, offs_l, sql, offs_d, d, offs_l < length)
            ql = _project(q, w_ptr, f_tile * BK, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            r = tl.load(stats_ptr + row64 * length + offs_l, mask=offs_l < length, other=0.0)
            a = _stabilised(_query_features(ql, r, features, SOFTMAX), features, eps)
            if SOFTMAX:
                g = tl.load(
                    stats_ptr + 3 * size + row64 * length + offs_l, mask=valid, other=float("-inf")
                )
                entering = tl.load(chunk_max_ptr + slot - 1, mask=c > 0, other=FLOOR)
                leaving = tl.load(chunk_max_ptr + slot)
                a = a * tl.exp(entering - _running_max(g, offs_t, entering))[:, None]
                rescale = tl.exp(entering - leaving)
                gh = _dot_acc(tl.trans(a), dy, gh * rescale, PRECISION)
                gz = gz * rescale + tl.sum(a * dy_den[:, None], axis=0)
            else:
                gh = _dot_acc(tl.trans(a), dy, gh, PRECISION)
                gz += tl.sum(a * dy_den[:, None], axis=0)
            qsum = tl.load(
                stats_ptr + size + row64 * length + offs_l, mask=offs_l < length, other=0.0
            )
            gp += eps * tl.sum(qsum[:, None] * dy, axis=0)


@triton.jit
def _output_grad(do_base, o_base, den_row, offs_l, sdl, sol, offs_c, offs_d, d, valid):
    """dy = d loss / d y for the positions offs_l: columns offs_c of dout / den (BT, len(offs_c))
    and the normaliser's -(dout . out) / den (BT,); zero at padded positions."""
    den = tl.load(den_row + offs_l, mask=valid, other=1.0)
    inverse = tl.where(valid & (den > 0.0), 1.0 / tl.where(den > 0.0, den, 1.0), 0.0)
    dout = _load_tile(do_base, offs_l, sdl, offs_d, d, valid)
    out = _load_tile(o_base, offs_l, sol, offs_d, d, valid)
    dy_den = -tl.sum(dout * out, axis=1) * inverse
    dy = _load_tile(do_base, offs_l, sdl, offs_c, d, valid) * inverse[:, None]
    return dy, dy_den


@triton.jit
def _chunk_scales(stats_ptr, chunk_max_ptr, size, row64, length, chunks, c, offs_l, offs_t,
                  valid, SOFTMAX: tl.constexpr, TRANSPOSED: tl.constexpr):  # fmt: skip
    """For chunk c: decay (BT, BT) = exp(g_j - M_i) at [i, j] for j <= i, else 0 (at [j, i]
    when TRANSPOSED); entry (BT,) = exp(Mp - M_i); key_scale (BT,) = exp(g_j - Mc). ReLU: decay
    1 where j <= i at valid keys, entry 1, key_scale 1 at valid keys."""
    if TRANSPOSED:
        offs_i = offs_t[None, :]
        offs_j = offs_t[:, None]
    else:
        offs_i = offs_t[:, None]
        offs_j = offs_t[None, :]
    if SOFTMAX:
        g = tl.load(stats_ptr + 3 * size + row64 * length + offs_l, mask=valid, other=float("-inf"))
        slot = row64 * chunks + c
        entering = tl.load(chunk_max_ptr + slot - 1, mask=c > 0, other=FLOOR)
        leaving = tl.load(chunk_max_ptr + slot)
        running = _running_max(g, offs_t, entering)
        if TRANSPOSED:
            exponent = tl.where(offs_j <= offs_i, g[:, None] - running[None, :], float("-inf"))
        else:
            exponent = tl.where(offs_j <= offs_i, g[None, :] - running[:, None], float("-inf"))
        return tl.exp(exponent), tl.exp(entering - running), tl.exp(g - leaving)
    else:
        if TRANSPOSED:
            decay = tl.where((offs_j <= offs_i) & valid[:, None], 1.0, 0.0)
        else:
            decay = tl.where((offs_j <= offs_i) & valid[None, :], 1.0, 0.0)
        return decay, tl.where(offs_t >= 0, 1.0, 0.0), tl.where(valid, 1.0, 0.0)


@autotune(_chunk_configs(), key=TUNE_KEY)
@triton.jit
def _output_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, stats_ptr, chunk_max_ptr,
    h_ptr, z_ptr, p_ptr, count_ptr, o_ptr, den_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, spb,
    heads, length, d, m, chunks, eps,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (chunks, N): out (and the normaliser den, kept for the backward) of one chunk.

    Live across the feature loop: the scores X = Q'' Ê^T and y's two accumulators; q and k
    are loaded again in each pass of the loop (from cache) rather than held in registers."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    size = tl.num_programs(1).to(tl.int64) * length
    offs_t = tl.arange(0, BT)
    offs_l = c * BT + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
    inside = offs_l < length
    q_base = _row_base(q_ptr, row, heads, sqb, sqh)
    k_base = _row_base(k_ptr, row, heads, skb, skh)
    r = tl.load(stats_ptr + row64 * length + offs_l, mask=inside, other=0.0)
    kmax = tl.load(stats_ptr + 2 * size + row64 * length + offs_l, mask=valid, other=0.0)
    slot = row64 * chunks + c
    scores = tl.zeros([BT, BT], tl.float32)
    acc = tl.zeros([BT, BLOCK_D], tl.float32)
    acc_den = tl.zeros([BT], tl.float32)
    for f0 in range(0, BLOCK_M, BK):
        offs_f = f0 + tl.arange(0, BK)
        features = offs_f < m
        q = _load_tile(q_base, offs_l, sql, offs_d, d, inside)
        ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        a = _stabilised(_query_features(ql, r, features, SOFTMAX), features, eps)
        k = _load_tile(k_base, offs_l, skl, offs_d, d, valid)
        kl = _project(k, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        keys = _key_features(kl, kmax, valid[:, None] & features[None, :], SOFTMAX)
        scores = _dot_acc(a, tl.trans(keys), scores, PRECISION)
        state = tl.load(h_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :])
        acc = _dot_acc(a, state, acc, PRECISION)
        acc_den += tl.sum(a * tl.load(z_ptr + slot * BLOCK_M + offs_f)[None, :], axis=1)
    decay, entry, _key_scale = _chunk_scales(stats_ptr, chunk_max_ptr, size, row64, length,
                                            chunks, c, offs_l, offs_t, valid, SOFTMAX, False)  # fmt: skip
    qsum = tl.load(stats_ptr + size + row64 * length + offs_l, mask=inside, other=0.0)
    lower = offs_t[None, :] <= offs_t[:, None]
    ones = valid.to(tl.float32)
    attention = tl.where(lower, scores * decay + eps * qsum[:, None] * ones[None, :], 0.0)
    v = _load_tile(_row_base(v_ptr, row, heads, svb, svh), offs_l, svl, offs_d, d, valid)
    p = tl.load(p_ptr + slot * BLOCK_D + offs_d)
    count = tl.load(count_ptr + slot)
    y = acc * entry[:, None] + eps * qsum[:, None] * p[None, :]
    y = _dot_acc(attention, v, y, PRECISION)
    y_den = acc_den * entry + eps * qsum * count + tl.sum(attention, axis=1)
    safe = tl.where(y_den > 0.0, y_den, 1.0)  # no 0 / 0 at padding, even unselected
    out = tl.where(valid[:, None] & (y_den[:, None] > 0.0), y / safe[:, None], 0.0)
    o_base = _row_base(o_ptr, row, heads, sob, soh)
    pointers = o_base + offs_l[:, None].to(tl.int64) * sol + offs_d[None, :]
    tl.store(pointers, out.to(o_ptr.dtype.element_ty), mask=inside[:, None] & (offs_d[None, :] < d))
    tl.store(den_ptr + row64 * length + offs_l, y_den, mask=inside)


@triton.jit
def _chunk_backward_common(
    v_ptr, pad_ptr, do_ptr, o_ptr, den_ptr, stats_ptr, chunk_max_ptr,
    svb, svh, svl, sdb, sdh, sdl, sob, soh, sol, spb,
    heads, length, d, chunks, c, row, size,
    BT: tl.constexpr, BLOCK_D: tl.constexpr, SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """What dq and dk/dv of chunk c both need before their feature loops: dy (BT, BLOCK_D) and
    its last column dy_den (BT,); BD = B * decay (BT, BT) at [i, j], B_ij = dy_i . V~_j, zero
    for j > i (at [j, i] when TRANSPOSED, as dk/dv use it); b_valid (BT,) = sum_{j <= i}
    valid_j B_ij; the stats; entry and key_scale."""
    row64 = row.to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_l = c * BT + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
    inside = offs_l < length
    v = _load_tile(_row_base(v_ptr, row, heads, svb, svh), offs_l, svl, offs_d, d, valid)
    dy, dy_den = _output_grad(_row_base(do_ptr, row, heads, sdb, sdh),
                              _row_base(o_ptr, row, heads, sob, soh), den_ptr + row64 * length,
                              offs_l, sdl, sol, offs_d, offs_d, d, valid)  # fmt: skip
    r = tl.load(stats_ptr + row64 * length + offs_l, mask=inside, other=0.0)
    kmax = tl.load(stats_ptr + 2 * size + row64 * length + offs_l, mask=valid, other=0.0)
    decay, entry, key_scale = _chunk_scales(stats_ptr, chunk_max_ptr, size, row64, length,
                                            chunks, c, offs_l, offs_t, valid, SOFTMAX,
                                            TRANSPOSED)  # fmt: skip
    if TRANSPOSED:
        b = _dot(v, tl.trans(dy), PRECISION) + dy_den[None, :]
        lower = offs_t[:, None] <= offs_t[None, :]
        b_valid = tl.sum(tl.where(lower & valid[:, None], b, 0.0), axis=0)
    else:
        b = _dot(dy, tl.trans(v), PRECISION) + dy_den[:, None]
        lower = offs_t[None, :] <= offs_t[:, None]
        b_valid = tl.sum(tl.where(lower & valid[None, :], b, 0.0), axis=1)
    b_decayed = tl.where(lower, b * decay, 0.0)
    return valid, inside, dy, dy_den, b_decayed, b_valid, r, kmax, entry, key_scale


@autotune(_chunk_configs(), key=TUNE_KEY)
@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, do_ptr, o_ptr, den_ptr, stats_ptr, chunk_max_ptr,
    h_ptr, z_ptr, p_ptr, count_ptr, dq_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol, sgb, sgh, sgl, spb,
    heads, length, d, m, chunks, eps,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (chunks, N): dq of one chunk.

        dQ''_i = exp(Mp - M_i) H_c dy_i + sum_{j <= i} BD_ij Ê_j
                 + eps (P_c . dy_i + sum_{j <= i} valid_j B_ij),
    then dq = (dQ'' * E_q) W^T (softmax; ReLU: masked where the logit is <= 0)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    size = tl.num_programs(1).to(tl.int64) * length
    valid, inside, dy, dy_den, b_decayed, b_valid, r, kmax, entry, _key_scale = (
        _chunk_backward_common(
            v_ptr, pad_ptr, do_ptr, o_ptr, den_ptr, stats_ptr, chunk_max_ptr,
            svb, svh, svl, sdb, sdh, sdl, sob, soh, sol, spb,
            heads, length, d, chunks, c, row, size, BT, BLOCK_D, SOFTMAX, HAS_MASK, PRECISION,
            False,
        )
    )  # fmt: skip
    offs_t = tl.arange(0, BT)
    offs_l = c * BT + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    slot = row64 * chunks + c
    p = tl.load(p_ptr + slot * BLOCK_D + offs_d)
    count = tl.load(count_ptr + slot)
    constant = eps * (tl.sum(dy * p[None, :], axis=1) + count * dy_den + b_valid)
    q_base = _row_base(q_ptr, row, heads, sqb, sqh)
    k_base = _row_base(k_ptr, row, heads, skb, skh)
    dq = tl.zeros([BT, BLOCK_D], tl.float32)
    for f0 in range(0, BLOCK_M, BK):
        offs_f = f0 + tl.arange(0, BK)
        features = offs_f < m
        q = _load_tile(q_base, offs_l, sql, offs_d, d, inside)
        ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        e = _query_features(ql, r, features, SOFTMAX)
        k = _load_tile(k_base, offs_l, skl, offs_d, d, valid)
        kl = _project(k, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        keys = _key_features(kl, kmax, valid[:, None] & features[None, :], SOFTMAX)
        state = tl.load(h_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :])
        z = tl.load(z_ptr + slot * BLOCK_M + offs_f)
        da = _dot(dy, tl.trans(state), PRECISION) + dy_den[:, None] * z[None, :]
        da = _dot_acc(b_decayed, keys, da * entry[:, None] + constant[:, None], PRECISION)
        dl = _feature_grad(da, e, ql, features[None, :], SOFTMAX)
        dq = _unproject(dl, dq, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
    base = _row_base(dq_ptr, row, heads, sgb, sgh)
    pointers = base + offs_l[:, None].to(tl.int64) * sgl + offs_d[None, :]
    tl.store(pointers, dq.to(dq_ptr.dtype.element_ty), mask=inside[:, None] & (offs_d[None, :] < d))


@autotune(_chunk_configs(), key=TUNE_KEY)
@triton.jit
def _dkv_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, do_ptr, o_ptr, den_ptr, stats_ptr, chunk_max_ptr,
    gh_ptr, gz_ptr, gp_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol,
    skgb, skgh, skgl, svgb, svgh, svgl, spb,
    heads, length, d, m, chunks, eps, inv_sqrt_d,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (chunks, N): dk and dv of one chunk, from within it (through A) and from the chunks
    after it (through G_c, the gradient of the state leaving it, at the scale exp(-Mc)):

        dÊ_j = sum_{i >= j} BD_ij Q''_i + exp(g_j - Mc) G_c V~_j
        dg_j = sum_{i >= j} BD_ij X_ij + K^_j . G_c V~_j,   X = Q'' Ê^T, K^_j = Ê_j exp(g_j - Mc)
        dV~_j = sum_{i >= j} A_ij dy_i + K^_j G_c + valid_j (gradient of P leaving c)
    then dk = (dÊ * Ê) W^T - dg k / sqrt(d) (softmax; ReLU: masked where the logit is <= 0).
    The decay and dy, needed after the feature loop only, are formed again there."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    size = tl.num_programs(1).to(tl.int64) * length
    valid, inside, _dy, _dy_den, b_decayed, _b_valid, r, kmax, _entry, key_scale = (
        _chunk_backward_common(
            v_ptr, pad_ptr, do_ptr, o_ptr, den_ptr, stats_ptr, chunk_max_ptr,
            svb, svh, svl, sdb, sdh, sdl, sob, soh, sol, spb,
            heads, length, d, chunks, c, row, size, BT, BLOCK_D, SOFTMAX, HAS_MASK, PRECISION,
            True,
        )
    )  # fmt: skip
    offs_t = tl.arange(0, BT)
    offs_l = c * BT + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    slot = row64 * chunks + c
    q_base = _row_base(q_ptr, row, heads, sqb, sqh)
    k_base = _row_base(k_ptr, row, heads, skb, skh)
    v_base = _row_base(v_ptr, row, heads, svb, svh)
    scores = tl.zeros([BT, BT], tl.float32)  # X^T, keys by queries, as BD (b_decayed)
    dk = tl.zeros([BT, BLOCK_D], tl.float32)
    dv = tl.zeros([BT, BLOCK_D], tl.float32)
    dg = tl.zeros([BT], tl.float32)
    for f0 in range(0, BLOCK_M, BK):
        offs_f = f0 + tl.arange(0, BK)
        features = offs_f < m
        keep = valid[:, None] & features[None, :]
        q = _load_tile(q_base, offs_l, sql, offs_d, d, inside)
        ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        a = _stabilised(_query_features(ql, r, features, SOFTMAX), features, eps)
        k = _load_tile(k_base, offs_l, skl, offs_d, d, valid)
        kl = _project(k, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        keys = _key_features(kl, kmax, keep, SOFTMAX)
        scores = _dot_acc(keys, tl.trans(a), scores, PRECISION)  # X^T: [j, i]
        later = tl.load(gh_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :])
        later_den = tl.load(gz_ptr + slot * BLOCK_M + offs_f)
        v = _load_tile(v_base, offs_l, svl, offs_d, d, valid)
        through = _dot(v, tl.trans(later), PRECISION) + later_den[None, :]  # G_c V~_j (BT, BK)
        scaled = keys * key_scale[:, None]  # K^ (ReLU: Ê)
        de = _dot_acc(b_decayed, a, through * key_scale[:, None], PRECISION)
        dg += tl.sum(scaled * through, axis=1)
        dv = _dot_acc(scaled, later, dv, PRECISION)
        dl = _feature_grad(de, keys, kl, keep, SOFTMAX)
        dk = _unproject(dl, dk, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
    # dk first and stored, so that its tiles are free before dv's product with A.
    mask = inside[:, None] & (offs_d[None, :] < d)
    if SOFTMAX:
        dg += tl.sum(b_decayed * scores, axis=1)
        k = _load_tile(k_base, offs_l, skl, offs_d, d, valid)
        dk -= dg[:, None] * k * inv_sqrt_d
    dk_base = _row_base(dk_ptr, row, heads, skgb, skgh)
    pointers = dk_base + offs_l[:, None].to(tl.int64) * skgl + offs_d[None, :]
    tl.store(pointers, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    decay, _entry, _key_scale = _chunk_scales(
        stats_ptr,
        chunk_max_ptr,
        size,
        row64,
        length,
        chunks,
        c,
        offs_l,
        offs_t,
        valid,
        SOFTMAX,
        True,
    )
    qsum = tl.load(stats_ptr + size + row64 * length + offs_l, mask=inside, other=0.0)
    lower = offs_t[:, None] <= offs_t[None, :]
    ones = valid.to(tl.float32)
    attention = tl.where(lower, scores * decay + eps * ones[:, None] * qsum[None, :], 0.0)  # A^T
    dy_again, _dy_den = _output_grad(
        _row_base(do_ptr, row, heads, sdb, sdh), _row_base(o_ptr, row, heads, sob, soh),
        den_ptr + row64 * length, offs_l, sdl, sol, offs_d, offs_d, d, valid,
    )  # fmt: skip
    later_values = tl.load(gp_ptr + slot * BLOCK_D + offs_d)
    dv += ones[:, None] * later_values[None, :]
    dv = _dot_acc(attention, dy_again, dv, PRECISION)
    dv_base = _row_base(dv_ptr, row, heads, svgb, svgh)
    pointers = dv_base + offs_l[:, None].to(tl.int64) * svgl + offs_d[None, :]
    tl.store(pointers, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _like_model_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, H, L, d) tensor laid out as (B, L, H, d): the model's next step (heads back
    into the width, out.transpose(1, 2).reshape) is then a view, not a copy."""
    batch, heads, length, dim = x.shape
    return torch.empty(batch, length, heads, dim, dtype=dtype, device=x.device).transpose(1, 2)


def _states(p: Problem, q, k, v, stats, block_max, *, chunk_max, extras, backward=None):
    """Launch :func:`_states_kernel`: the forward scan (and, given ``backward`` = (dout, out,
    den), the reverse gradient scan beside it). Returns the buffers it wrote."""
    n = p.chunks
    h, z = p.empty(p.rows, n, p.block_m, p.block_d), p.empty(p.rows, n, p.block_m)
    if extras:
        values, count = p.empty(p.rows, n, p.block_d), p.empty(p.rows, n)
    else:
        values = count = z  # not written
    if backward is not None:
        dout, out, den = backward
        gh, gz = p.empty(p.rows, n, p.block_m, p.block_d), p.empty(p.rows, n, p.block_m)
        gp = p.empty(p.rows, n, p.block_d)
    else:
        dout = out = q
        den = gh = gz = gp = z  # not read or written
    directions = 1 if backward is None else 2
    bk = p.bk_small

    def grid(meta):
        return (p.rows, (p.block_m // bk) * meta["V_SPLIT"], directions)

    _states_kernel[grid](
        q, k, v, p.w, p.pad, stats, block_max, dout, out, den, chunk_max,
        h, z, values, count, gh, gz, gp,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(out), p.pad_stride,
        p.heads, p.length, p.d, p.m, n, p.eps,
        p.tune_length, BT=p.chunk, BK=bk, DIRECTIONS=directions, WRITE_EXTRAS=extras,
        **p.flags(),
    )  # fmt: skip
    return h, z, values, count, gh, gz, gp


class CausalFavorTriton(torch.autograd.Function):
    """Causal FAVOR+ on GPU tensors: (B, H, L, d) -> (B, H, L, d), zero at padded positions.

    ``apply(q, k, v, w, key_padding_mask, softmax, eps, chunk)``: q, k, v in any float dtype
    and strides (rows contiguous), w (d, m) float32 or None, key_padding_mask (B, L) bool or
    None. Kept for the backward: the inputs, the output, its normaliser (N, L) and the
    per-position statistics (4, N, L), the chunk maxima and value sums (N, n, d); the m x d
    states per chunk are recomputed, not kept, so memory stays O(L d) per layer.
    """

    @staticmethod
    @on_input_device
    def forward(ctx, q, k, v, w, key_padding_mask, softmax, eps, chunk):
        q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
        p = Problem(q, k, v, w, key_padding_mask, softmax, eps, chunk)
        stats, block_max = feature_stats(p, q, k)
        chunk_max = p.empty(p.rows, p.chunks)
        h, z, values, count, *_ = _states(
            p, q, k, v, stats, block_max, chunk_max=chunk_max, extras=True
        )
        out = _like_model_layout(v, v.dtype)
        den = p.empty(p.rows, p.length)
        _output_kernel[(p.chunks, p.rows)](
            q, k, v, p.w, p.pad, stats, chunk_max, h, z, values, count, out, den,
            *strides(q), *strides(k), *strides(v), *strides(out), p.pad_stride,
            p.heads, p.length, p.d, p.m, p.chunks, p.eps,
            p.tune_length, BT=p.chunk, BK=p.bk_small, **p.flags(),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, w, key_padding_mask, out, den, stats, block_max,
                              chunk_max, values, count)  # fmt: skip
        ctx.settings = (softmax, eps, chunk)
        return out

    @staticmethod
    @on_input_device
    def backward(ctx, grad):
        q, k, v, w, key_padding_mask, out, den, stats, block_max, chunk_max, values, count = (
            ctx.saved_tensors
        )
        p = Problem(q, k, v, w, key_padding_mask, *ctx.settings)
        grad = last_dim_contiguous(grad)
        h, z, _, _, gh, gz, gp = _states(
            p, q, k, v, stats, block_max, chunk_max=chunk_max, extras=False,
            backward=(grad, out, den),
        )  # fmt: skip
        common = (*strides(q), *strides(k), *strides(v), *strides(grad), *strides(out))
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = _like_model_layout(q, q.dtype)
            _dq_kernel[(p.chunks, p.rows)](
                q, k, v, p.w, p.pad, grad, out, den, stats, chunk_max, h, z, values, count, dq,
                *common, *strides(dq), p.pad_stride,
                p.heads, p.length, p.d, p.m, p.chunks, p.eps,
                p.tune_length, BT=p.chunk, BK=p.bk_small, **p.flags(),
            )  # fmt: skip
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk, dv = _like_model_layout(k, k.dtype), _like_model_layout(v, v.dtype)
            _dkv_kernel[(p.chunks, p.rows)](
                q, k, v, p.w, p.pad, grad, out, den, stats, chunk_max, gh, gz, gp, dk, dv,
                *common, *strides(dk), *strides(dv), p.pad_stride,
                p.heads, p.length, p.d, p.m, p.chunks, p.eps, 2 * p.half_inv_sqrt_d,
                p.tune_length, BT=p.chunk, BK=p.bk_small, **p.flags(),
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def causal_favor(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    softmax: bool,
    eps: float,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Causal FAVOR+: q, k, v (B, H, L, d) -> (B, H, L, d) in v's dtype, zero at padding.

    w (d, m) float32: the projection as :meth:`FastAttention.feature_weights` gives it (None:
    ReLU without a projection, m = d); key_padding_mask (B, L) bool, True at padding;
    ``softmax`` picks the feature map (else ReLU); ``eps`` the stabiliser; ``chunk`` the
    positions per chunk (a power of two >= 16). Differentiable in q, k and v.
    """
    return CausalFavorTriton.apply(q, k, v, w, key_padding_mask, softmax, eps, chunk)
