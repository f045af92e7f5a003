"""Bidirectional FAVOR+ in Triton: the context K''^T V~ and its normaliser, the output Q'' C, and
the hand-written backward, with the features recomputed wherever they are needed.

The PyTorch reference beside this is :mod:`protperf.favor.bidirectional`. Per row (N = batch *
heads rows): C = sum_j K''_j V~_j^T (m x (d+1): C and its last column z), with
K''_j = Ê_j exp(g_j - M) + eps * valid_j and M the max of g over the row's valid keys; then
y_i = Q''_i C and out_i = y_i[:d] / y_i[d]. The stabiliser's share, eps * sum_j valid_j V~_j on
every row of C, is folded into C once.

Backward, with dy_i = d loss / d y_i: dC = sum_i Q''_i dy_i^T; dQ''_i = C dy_i;
dK''_j = dC V~_j (so dÊ_j = exp(g_j - M) dK''_j and dg_j = K^_j . dK''_j, K^ = Ê exp(g - M));
dV~_j = K''_j^T dC.

Kernels (grid; what each recomputes):
    _stats_kernel (features.py)   (blocks, N)            the per-position maxima and sums
    _context_kernel               (N, m/BK, S)           C (MODE 0) or dC (MODE 1), summed over
                                                         S splits of the positions; Ê or Q''
    _reduce_kernel                (N, m/BK)              the S partial sums, in a fixed order
                                                         (only when S > 1)
    _output_kernel                (blocks, N)            y, out; Q''
    _grads_kernel                 (blocks, N)            dq, dk, dv; Q'' and Ê
Forward 3 or 4 launches, backward 2 or 3. Sums over splits are written and added in a fixed
order, never with atomics, so that the results are the same from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from protperf.favor.triton.causal import _like_model_layout, _output_grad
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
    _stabilised,
    _unproject,
    _valid,
    autotune,
    feature_stats,
    last_dim_contiguous,
    on_input_device,
    strides,
)


def _configs() -> list[triton.Config]:
    return [
        triton.Config({}, num_warps=4, num_stages=3),
        triton.Config({}, num_warps=8, num_stages=2),
    ]


@triton.jit
def _row_max(block_max_ptr, row64, blocks, RB: tl.constexpr):
    """M: the max of the block maxima of g over one row, at least FLOOR."""
    top = tl.full([RB], FLOOR, tl.float32)
    for start in range(0, blocks, RB):
        offs = start + tl.arange(0, RB)
        top = tl.maximum(top, tl.load(block_max_ptr + row64 * blocks + offs, mask=offs < blocks,
                                      other=FLOOR))  # fmt: skip
    return tl.max(top, axis=0)


@autotune(_configs(), key=[*TUNE_KEY, "MODE", "FOLD"])
@triton.jit
def _context_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, stats_ptr, block_max_ptr, do_ptr, o_ptr, den_ptr,
    part_ptr, part_z_ptr, part_p_ptr, part_count_ptr, row_max_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol, spb,
    heads, length, d, m, blocks, per_split, eps,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, MODE: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    """Grid (N, BLOCK_M/BK, S): one feature tile of one row, over ``per_split`` blocks of BT
    positions. MODE 0: part (N, S, BLOCK_M, BLOCK_D) = sum_j K^_j v_j^T, part_z = sum_j K^_j,
    part_p (N, S, BLOCK_D) = sum_j valid_j v_j, part_count = sum_j valid_j, and M (N,); with
    FOLD (S = 1) the eps share is added and part is the final C. MODE 1: part = sum_i Q''_i
    dy_i^T, part_z = sum_i Q''_i dy_i[d] (the gradient dC and its last column)."""
    row = tl.program_id(0)
    f_tile = tl.program_id(1)
    split = tl.program_id(2)
    row64 = row.to(tl.int64)
    size = tl.num_programs(0).to(tl.int64) * length
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = f_tile * BK + tl.arange(0, BK)
    features = offs_f < m
    acc = tl.zeros([BK, BLOCK_D], tl.float32)
    acc_z = tl.zeros([BK], tl.float32)
    values = tl.zeros([BLOCK_D], tl.float32)
    count = tl.sum(tl.zeros([BT], tl.float32), axis=0)
    first = split * per_split
    last = tl.minimum(first + per_split, blocks)
    if MODE == 0:
        k_base = _row_base(k_ptr, row, heads, skb, skh)
        v_base = _row_base(v_ptr, row, heads, svb, svh)
        if SOFTMAX:
            top = _row_max(block_max_ptr, row64, blocks, 256)
            tl.store(row_max_ptr + row64, top, mask=(f_tile == 0) & (split == 0))
        for block in range(first, last):
            offs_l = block * BT + offs_t
            valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
            k = _load_tile(k_base, offs_l, skl, offs_d, d, valid)
            v = _load_tile(v_base, offs_l, svl, offs_d, d, valid)
            kl = _project(k, w_ptr, f_tile * BK, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            keep = valid[:, None] & features[None, :]
            if SOFTMAX:
                kmax = tl.load(
                    stats_ptr + 2 * size + row64 * length + offs_l, mask=valid, other=0.0
                )
                g = tl.load(
                    stats_ptr + 3 * size + row64 * length + offs_l, mask=valid, other=float("-inf")
                )
                keys = _key_features(kl, kmax, keep, SOFTMAX) * tl.exp(g - top)[:, None]
            else:
                keys = _key_features(kl, kl, keep, SOFTMAX)
            acc = _dot_acc(tl.trans(keys), v, acc, PRECISION)
            acc_z += tl.sum(keys, axis=0)
            ones = valid.to(tl.float32)
            values += tl.sum(v * ones[:, None], axis=0)
            count += tl.sum(ones, axis=0)
        if FOLD:
            acc += eps * values[None, :]
            acc_z += eps * count
    else:
        q_base = _row_base(q_ptr, row, heads, sqb, sqh)
        do_base = _row_base(do_ptr, row, heads, sdb, sdh)
        o_base = _row_base(o_ptr, row, heads, sob, soh)
        for block in range(first, last):
            offs_l = block * BT + offs_t
            valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
            inside = offs_l < length
            q = _load_tile(q_base, offs_l, sql, offs_d, d, inside)
            dy, dy_den = _output_grad(do_base, o_base, den_ptr + row64 * length, offs_l, sdl,
                                      sol, offs_d, offs_d, d, valid)  # fmt: skip
            r = tl.load(stats_ptr + row64 * length + offs_l, mask=inside, other=0.0)
            ql = _project(q, w_ptr, f_tile * BK, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            a = _stabilised(_query_features(ql, r, features, SOFTMAX), features, eps)
            acc = _dot_acc(tl.trans(a), dy, acc, PRECISION)
            acc_z += tl.sum(a * dy_den[:, None], axis=0)
    slot = row64 * tl.num_programs(2) + split
    tl.store(part_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(part_z_ptr + slot * BLOCK_M + offs_f, acc_z)
    if MODE == 0:
        tl.store(
            part_p_ptr + slot * BLOCK_D + offs_d, values, mask=offs_d + f_tile * BLOCK_D < BLOCK_D
        )
        tl.store(part_count_ptr + slot, count, mask=f_tile == 0)


@triton.jit
def _reduce_kernel(
    part_ptr, part_z_ptr, part_p_ptr, part_count_ptr, c_ptr, z_ptr, splits, eps,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BK: tl.constexpr, ADD_EPS: tl.constexpr,
):  # fmt: skip
    """Grid (N, BLOCK_M/BK): C = sum_s part_s (+ eps sum_s part_p_s on every feature row when
    ADD_EPS), z likewise; splits added in order."""
    row64 = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BK + tl.arange(0, BK)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BK, BLOCK_D], tl.float32)
    acc_z = tl.zeros([BK], tl.float32)
    values = tl.zeros([BLOCK_D], tl.float32)
    count = tl.sum(tl.zeros([BK], tl.float32), axis=0)
    for split in range(0, splits):
        slot = row64 * splits + split
        acc += tl.load(part_ptr + (slot * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :])
        acc_z += tl.load(part_z_ptr + slot * BLOCK_M + offs_f)
        if ADD_EPS:
            values += tl.load(part_p_ptr + slot * BLOCK_D + offs_d)
            count += tl.load(part_count_ptr + slot)
    if ADD_EPS:
        acc += eps * values[None, :]
        acc_z += eps * count
    tl.store(c_ptr + (row64 * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(z_ptr + row64 * BLOCK_M + offs_f, acc_z)


@autotune(_configs(), key=TUNE_KEY)
@triton.jit
def _output_kernel(
    q_ptr, w_ptr, pad_ptr, stats_ptr, c_ptr, z_ptr, o_ptr, den_ptr,
    sqb, sqh, sql, sob, soh, sol, spb,
    heads, length, d, m, eps,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (blocks, N): y = Q'' C for BT positions; out = y[:d] / y[d], and den = y[d]."""
    block = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    offs_l = block * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BLOCK_D)
    inside = offs_l < length
    valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
    q = _load_tile(_row_base(q_ptr, row, heads, sqb, sqh), offs_l, sql, offs_d, d, inside)
    r = tl.load(stats_ptr + row64 * length + offs_l, mask=inside, other=0.0)
    acc = tl.zeros([BT, BLOCK_D], tl.float32)
    acc_den = tl.zeros([BT], tl.float32)
    for f0 in range(0, BLOCK_M, BK):
        offs_f = f0 + tl.arange(0, BK)
        ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        features = offs_f < m
        a = _stabilised(_query_features(ql, r, features, SOFTMAX), features, eps)
        context = tl.load(c_ptr + (row64 * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :])
        acc = _dot_acc(a, context, acc, PRECISION)
        acc_den += tl.sum(a * tl.load(z_ptr + row64 * BLOCK_M + offs_f)[None, :], axis=1)
    safe = tl.where(acc_den > 0.0, acc_den, 1.0)  # no 0 / 0 at padding, even unselected
    out = tl.where(valid[:, None] & (acc_den[:, None] > 0.0), acc / safe[:, None], 0.0)
    pointers = _row_base(o_ptr, row, heads, sob, soh) + offs_l[:, None].to(tl.int64) * sol
    mask = inside[:, None] & (offs_d[None, :] < d)
    tl.store(pointers + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(den_ptr + row64 * length + offs_l, acc_den, mask=inside)


@autotune(_configs(), key=TUNE_KEY)
@triton.jit
def _grads_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, stats_ptr, row_max_ptr, do_ptr, o_ptr, den_ptr,
    c_ptr, z_ptr, dc_ptr, dz_ptr, dq_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol,
    sqgb, sqgh, sqgl, skgb, skgh, skgl, svgb, svgh, svgl, spb,
    heads, length, d, m, eps, inv_sqrt_d,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (blocks, N): dq, dk, dv of BT positions from C and dC (module docstring)."""
    block = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    size = tl.num_programs(1).to(tl.int64) * length
    offs_l = block * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BLOCK_D)
    inside = offs_l < length
    valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
    q = _load_tile(_row_base(q_ptr, row, heads, sqb, sqh), offs_l, sql, offs_d, d, inside)
    k = _load_tile(_row_base(k_ptr, row, heads, skb, skh), offs_l, skl, offs_d, d, valid)
    v = _load_tile(_row_base(v_ptr, row, heads, svb, svh), offs_l, svl, offs_d, d, valid)
    dy, dy_den = _output_grad(_row_base(do_ptr, row, heads, sdb, sdh),
                              _row_base(o_ptr, row, heads, sob, soh), den_ptr + row64 * length,
                              offs_l, sdl, sol, offs_d, offs_d, d, valid)  # fmt: skip
    r = tl.load(stats_ptr + row64 * length + offs_l, mask=inside, other=0.0)
    kmax = tl.load(stats_ptr + 2 * size + row64 * length + offs_l, mask=valid, other=0.0)
    if SOFTMAX:
        g = tl.load(stats_ptr + 3 * size + row64 * length + offs_l, mask=valid, other=float("-inf"))
        key_scale = tl.exp(g - tl.load(row_max_ptr + row64))
    else:
        key_scale = tl.where(valid, 1.0, 0.0)
    dq = tl.zeros([BT, BLOCK_D], tl.float32)
    dk = tl.zeros([BT, BLOCK_D], tl.float32)
    dv = tl.zeros([BT, BLOCK_D], tl.float32)
    dg = tl.zeros([BT], tl.float32)
    column_sums = tl.zeros([BLOCK_D], tl.float32)
    for f0 in range(0, BLOCK_M, BK):
        offs_f = f0 + tl.arange(0, BK)
        features = offs_f < m
        keep = valid[:, None] & features[None, :]
        state = (row64 * BLOCK_M + offs_f[:, None]) * BLOCK_D + offs_d[None, :]
        context = tl.load(c_ptr + state)
        grad_context = tl.load(dc_ptr + state)
        ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        e = _query_features(ql, r, features, SOFTMAX)
        da = _dot(dy, tl.trans(context), PRECISION)
        da += dy_den[:, None] * tl.load(z_ptr + row64 * BLOCK_M + offs_f)[None, :]
        dl = _feature_grad(da, e, ql, features[None, :], SOFTMAX)
        dq = _unproject(dl, dq, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        kl = _project(k, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        keys = _key_features(kl, kmax, keep, SOFTMAX)
        scaled = keys * key_scale[:, None]
        dkeys = _dot(v, tl.trans(grad_context), PRECISION)  # dK''_j = dC V~_j (BT, BK)
        dkeys += tl.load(dz_ptr + row64 * BLOCK_M + offs_f)[None, :]
        dg += tl.sum(scaled * dkeys, axis=1)
        dv = _dot_acc(scaled, grad_context, dv, PRECISION)
        dl = _feature_grad(dkeys * key_scale[:, None], keys, kl, keep, SOFTMAX)
        dk = _unproject(dl, dk, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
        column_sums += tl.sum(tl.where(features[:, None], grad_context, 0.0), axis=0)
    dv += eps * valid.to(tl.float32)[:, None] * column_sums[None, :]
    if SOFTMAX:
        dk -= dg[:, None] * k * inv_sqrt_d
    mask = inside[:, None] & (offs_d[None, :] < d)
    offs = offs_l[:, None].to(tl.int64)
    tl.store(_row_base(dq_ptr, row, heads, sqgb, sqgh) + offs * sqgl + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(_row_base(dk_ptr, row, heads, skgb, skgh) + offs * skgl + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(_row_base(dv_ptr, row, heads, svgb, svgh) + offs * svgl + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def default_splits(p: Problem) -> int:
    """Splits of the positions for the context sums: enough programs for two per
    multiprocessor, each split at least 8 blocks long."""
    if p.device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(p.device).multi_processor_count
    programs = p.rows * (p.block_m // p.bk)
    return max(1, min(triton.cdiv(2 * processors, programs), p.chunks // 8))


def _context(p: Problem, mode: int, splits: int, q, k, v, stats, block_max, backward=None):
    """Launch :func:`_context_kernel` (and :func:`_reduce_kernel` when splits > 1): returns
    (C, z) (N, BLOCK_M, BLOCK_D), (N, BLOCK_M), and M (N,) in MODE 0."""
    splits = max(1, min(splits, p.chunks))
    per_split = triton.cdiv(p.chunks, splits)
    splits = triton.cdiv(p.chunks, per_split)  # no empty split
    part = p.empty(p.rows, splits, p.block_m, p.block_d)
    part_z = p.empty(p.rows, splits, p.block_m)
    part_p, part_count = p.empty(p.rows, splits, p.block_d), p.empty(p.rows, splits)
    row_max = p.empty(p.rows)
    dout, out, den = backward if backward is not None else (q, q, stats)
    fold = splits == 1 and mode == 0
    _context_kernel[(p.rows, p.block_m // p.bk, splits)](
        q, k, v, p.w, p.pad, stats, block_max, dout, out, den,
        part, part_z, part_p, part_count, row_max,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(out), p.pad_stride,
        p.heads, p.length, p.d, p.m, p.chunks, per_split, p.eps,
        p.tune_length, BT=p.chunk, BK=p.bk, MODE=mode, FOLD=fold, **p.flags(),
    )  # fmt: skip
    if splits == 1:
        return part[:, 0], part_z[:, 0], row_max
    context, context_z = p.empty(p.rows, p.block_m, p.block_d), p.empty(p.rows, p.block_m)
    _reduce_kernel[(p.rows, p.block_m // p.bk)](
        part, part_z, part_p, part_count, context, context_z, splits, p.eps,
        BLOCK_D=p.block_d, BLOCK_M=p.block_m, BK=p.bk, ADD_EPS=mode == 0,
    )  # fmt: skip
    return context, context_z, row_max


class BidirectionalFavorTriton(torch.autograd.Function):
    """Bidirectional FAVOR+ on GPU tensors: (B, H, L, d) -> (B, H, L, d), zero at padding.

    ``apply(q, k, v, w, key_padding_mask, softmax, eps, chunk, splits)``: as
    :class:`~protperf.favor.triton.causal.CausalFavorTriton`; ``splits`` (None: by the GPU's
    size) cuts the positions of the context sums. Kept for the backward: the inputs, the
    output and its normaliser, the statistics, C and M; dC is formed in the backward.
    """

    @staticmethod
    @on_input_device
    def forward(ctx, q, k, v, w, key_padding_mask, softmax, eps, chunk, splits):
        q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
        p = Problem(q, k, v, w, key_padding_mask, softmax, eps, chunk)
        splits = default_splits(p) if splits is None else splits
        stats, block_max = feature_stats(p, q, k)
        context, context_z, row_max = _context(p, 0, splits, q, k, v, stats, block_max)
        out = _like_model_layout(v, v.dtype)
        den = p.empty(p.rows, p.length)
        _output_kernel[(p.chunks, p.rows)](
            q, p.w, p.pad, stats, context, context_z, out, den,
            *strides(q), *strides(out), p.pad_stride,
            p.heads, p.length, p.d, p.m, p.eps,
            p.tune_length, BT=p.chunk, BK=p.bk_small, **p.flags(),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, w, key_padding_mask, out, den, stats, block_max,
                              context, context_z, row_max)  # fmt: skip
        ctx.settings = (softmax, eps, chunk, splits)
        return out

    @staticmethod
    @on_input_device
    def backward(ctx, grad):
        q, k, v, w, key_padding_mask, out, den, stats, block_max, context, context_z, row_max = (
            ctx.saved_tensors
        )
        softmax, eps, chunk, splits = ctx.settings
        p = Problem(q, k, v, w, key_padding_mask, softmax, eps, chunk)
        grad = last_dim_contiguous(grad)
        grad_context, grad_z, _ = _context(
            p, 1, splits, q, k, v, stats, block_max, backward=(grad, out, den)
        )
        dq, dk, dv = (_like_model_layout(x, x.dtype) for x in (q, k, v))
        _grads_kernel[(p.chunks, p.rows)](
            q, k, v, p.w, p.pad, stats, row_max, grad, out, den,
            context, context_z, grad_context, grad_z, dq, dk, dv,
            *strides(q), *strides(k), *strides(v), *strides(grad), *strides(out),
            *strides(dq), *strides(dk), *strides(dv), p.pad_stride,
            p.heads, p.length, p.d, p.m, p.eps, 2 * p.half_inv_sqrt_d,
            p.tune_length, BT=p.chunk, BK=p.bk_small, **p.flags(),
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def bidirectional_favor(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    softmax: bool,
    eps: float,
    chunk: int = DEFAULT_CHUNK,
    splits: int | None = None,
) -> torch.Tensor:
    """Bidirectional FAVOR+: q, k, v (B, H, L, d) -> (B, H, L, d) in v's dtype, zero at padding.

    Arguments as :func:`~protperf.favor.triton.causal.causal_favor`; ``chunk`` is the block of
    positions each program takes, ``splits`` how many programs share one row's context sums
    (None: enough to fill the GPU). Differentiable in q, k and v.
    """
    return BidirectionalFavorTriton.apply(q, k, v, w, key_padding_mask, softmax, eps, chunk, splits)
