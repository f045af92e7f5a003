"""The FAVOR+ feature maps as Triton building blocks, and the per-position statistics kernel.

The PyTorch reference beside this is :mod:`protperf.favor.features`. Nothing here forms an
L x m feature tensor in memory: the kernels of :mod:`protperf.favor.triton.bidirectional` and
:mod:`protperf.favor.triton.causal` call these ``@triton.jit`` helpers on tiles in registers,
BT positions by BK features at a time, and recompute the features wherever they are needed (in
the backward too) from q, k and the projection W. Shapes per row (N = batch * heads rows):
q, k (L, d); W (d, m), for softmax already scaled by d^-1/4.

* Softmax: E_q = exp(qW - r), r = max_f (qW)_f; Ê_k = exp(kW - kmax), kmax = max_f (kW)_f;
  the key log-scale g = kmax - |k|^2 / (2 sqrt d) (-inf at padded keys), so that
  Ê_k exp(g) = exp(kW - |k|^2 / (2 sqrt d)).
* ReLU: E = ReLU(xW), or ReLU(x) without a projection (then m = d).
* Q'' = E_q + eps (the ``a`` of the kernels), K'' = Ê_k exp(g - M) + eps * valid.

The per-position maxima r and kmax need all m features of a position before any tile of them
can be exponentiated, so :func:`feature_stats` finds them first (with g, and the query feature
sums that the stabiliser's share of the output needs) in one pass over q and k: four floats per
position, the only per-position state the other kernels read besides q, k, v.

Numerics as on the CPU: features in float32, the products on tensor cores with float32
accumulation. The operand precision follows ``torch.get_float32_matmul_precision()`` (as
PyTorch's own float32 products do on CUDA): "high" multiplies TF32 operands, "highest" 3xTF32
(float32 accuracy on tensor cores), "medium" bfloat16 operands. Under Triton's CPU interpreter
the products are plain float32 (numpy).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

#: Whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET, read by ``triton.jit``
#: when the kernels below are decorated): then every kernel has one configuration, as the
#: interpreter measures nothing worth tuning.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: "No valid key yet": the running max of the key log-scales starts here. Finite, so that the
#: rescale of an empty state is exp(FLOOR - FLOOR) = 1, where -inf - (-inf) would be NaN.
FLOOR = tl.constexpr(-1.0e30)

#: Positions per chunk (causal) or per block (bidirectional) on a GPU: 64-row tiles are what
#: Hopper's warpgroup matrix instructions take, and a 64 x 64 float32 tile is 16 registers per
#: thread at 8 warps, so that the backward's handful of live tiles stays out of local memory.
DEFAULT_CHUNK = 64
#: Features per tile in the kernels that hold one tile at a time while streaming positions (the
#: statistics, the bidirectional context sums): 64, the kernels loop over the m / 64 tiles.
FEATURE_TILE = 64
#: Features per tile where more is live: the per-chunk kernels, which hold a chunk's scores and
#: several accumulators across their feature loop, and the causal state scan, whose programs
#: are then twice as many (its parallelism is rows x m / tile). With 32, compiled for sm_90 at
#: 8 warps, they stay within the 255 registers a thread has (the dk/dv kernel excepted).
SMALL_FEATURE_TILE = 32

_AUTOTUNE_EXTRA = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters
    else {}
)


#: PROTPERF_TRITON_AUTOTUNE=0 (read when the kernels are first imported): every kernel runs its
#: first configuration untuned, as under the interpreter; for checks that compile many variants.
AUTOTUNE = os.environ.get("PROTPERF_TRITON_AUTOTUNE", "1") != "0"


#: What every kernel's tuned choice depends on (the kernels add their own switches).
TUNE_KEY = ["TUNE_LENGTH", "BLOCK_D", "BLOCK_M", "SOFTMAX", "HAS_W", "HAS_MASK", "PRECISION"]


def autotune(configs: list[triton.Config], key: list[str], **options):
    """``triton.autotune`` over ``configs`` on a GPU; their first alone under the interpreter
    (or with PROTPERF_TRITON_AUTOTUNE=0).

    Tuned choices are cached on disk where Triton supports it, so that a benchmark's fresh
    processes do not tune again."""
    if INTERPRET or not AUTOTUNE:
        return triton.autotune(configs[:1], key=key)
    return triton.autotune(configs, key=key, **options, **_AUTOTUNE_EXTRA)


def dot_precision() -> str:
    """The ``tl.dot`` operand precision matching PyTorch's float32 matmul setting."""
    if INTERPRET:
        return "ieee"
    return {"highest": "tf32x3", "high": "tf32", "medium": "bf16"}[
        torch.get_float32_matmul_precision()
    ]


def next_power_of_2(x: int, at_least: int = 16) -> int:
    """Tile sizes: powers of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(at_least, triton.next_power_of_2(x))


def tune_length(length: int) -> int:
    """The length bucket the autotuner keys on: one tuning per power of two, not per length."""
    return triton.next_power_of_2(max(length, 1024))


# ---------------------------------------------------------------------------------------------
# Building blocks (inlined into the kernels)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation; float32 operands rounded as PRECISION says."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _dot_acc(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in place by the matrix instruction (no temporary tile)."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc, out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _row_base(ptr, row, heads, stride_b, stride_h):
    """Pointer to row ``row`` = (batch, head) of a (B, H, L, d) tensor with these strides."""
    batch = row // heads
    head = row - batch * heads
    return ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def _load_tile(base, offs_l, stride_l, offs_c, width, rows):
    """(len(offs_l), len(offs_c)) float32 tile of positions offs_l, columns offs_c < width;
    zero in the rows where ``rows`` is False."""
    pointers = base + offs_l[:, None].to(tl.int64) * stride_l + offs_c[None, :]
    mask = rows[:, None] & (offs_c[None, :] < width)
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _valid(pad_ptr, row, heads, stride_pb, offs_l, length, HAS_MASK: tl.constexpr):
    """True at real positions: inside the sequence and not padding (key_padding_mask False)."""
    inside = offs_l < length
    if HAS_MASK:
        batch = row // heads
        pad = tl.load(pad_ptr + batch.to(tl.int64) * stride_pb + offs_l, mask=inside, other=1)
        return inside & (pad == 0)
    else:
        return inside


@triton.jit
def _project(
    x,
    w_ptr,
    f0,
    d,
    m,
    BLOCK_D: tl.constexpr,
    BK: tl.constexpr,
    HAS_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits of features f0 .. f0+BK: x (BT, BLOCK_D) @ W[:, f0:f0+BK] -> (BT, BK); without a
    projection x itself (then BK = BLOCK_D and f0 = 0)."""
    if HAS_W:
        offs_d = tl.arange(0, BLOCK_D)
        offs_f = f0 + tl.arange(0, BK)
        mask = (offs_d[:, None] < d) & (offs_f[None, :] < m)
        w = tl.load(w_ptr + offs_d[:, None] * m + offs_f[None, :], mask=mask, other=0.0)
        return _dot(x, w, PRECISION)
    else:
        return x


@triton.jit
def _unproject(
    grad,
    acc,
    w_ptr,
    f0,
    d,
    m,
    BLOCK_D: tl.constexpr,
    BK: tl.constexpr,
    HAS_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + the gradient of :func:`_project`: grad (BT, BK) @ W[:, f0:f0+BK]^T -> (BT, BLOCK_D)."""
    if HAS_W:
        offs_d = tl.arange(0, BLOCK_D)
        offs_f = f0 + tl.arange(0, BK)
        mask = (offs_f[:, None] < m) & (offs_d[None, :] < d)
        w_t = tl.load(w_ptr + offs_f[:, None] + offs_d[None, :] * m, mask=mask, other=0.0)
        return _dot_acc(grad, w_t, acc, PRECISION)
    else:
        return acc + grad


@triton.jit
def _query_features(logits, r, features, SOFTMAX: tl.constexpr):
    """E_q of a (BT, BK) tile of query logits, zero at padded features (``features`` (BK,)
    False). Softmax: exp(logits - r), r (BT,) the position's max."""
    if SOFTMAX:
        return tl.where(features[None, :], tl.exp(logits - r[:, None]), 0.0)
    else:
        return tl.where(features[None, :], tl.maximum(logits, 0.0), 0.0)


@triton.jit
def _stabilised(e, features, eps):
    """Q'' = E_q + eps, zero at padded features."""
    return tl.where(features[None, :], e + eps, 0.0)


@triton.jit
def _key_features(logits, kmax, keep, SOFTMAX: tl.constexpr):
    """Ê_k of a (BT, BK) tile of key logits, zero where ``keep`` (BT, BK) is False (padded keys
    and features). Softmax: exp(logits - kmax), kmax (BT,) the position's max."""
    if SOFTMAX:
        return tl.where(keep, tl.exp(logits - kmax[:, None]), 0.0)
    else:
        return tl.where(keep, tl.maximum(logits, 0.0), 0.0)


@triton.jit
def _feature_grad(grad, e, logits, keep, SOFTMAX: tl.constexpr):
    """d logits from d features: grad * E (softmax, the max a constant) or ReLU's mask."""
    if SOFTMAX:
        return grad * e
    else:
        return tl.where(keep & (logits > 0.0), grad, 0.0)


@triton.jit
def _running_max(g, offs, floor):
    """M_i = max(floor, max_{j <= i} g_j) within a tile: g (BT,) -> (BT,). A BT x BT masked max
    rather than a scan: exact, and a few thousand comparisons per chunk."""
    seen = tl.where(offs[None, :] <= offs[:, None], g[None, :], float("-inf"))
    return tl.maximum(tl.max(seen, axis=1), floor)


# ---------------------------------------------------------------------------------------------
# Per-position statistics
# ---------------------------------------------------------------------------------------------


@autotune(
    [triton.Config({}, num_warps=4, num_stages=2), triton.Config({}, num_warps=8, num_stages=2)],
    key=["TUNE_LENGTH", "BLOCK_D", "BLOCK_M", "SOFTMAX", "HAS_W", "HAS_MASK", "PRECISION"],
)
@triton.jit
def _stats_kernel(
    q_ptr, k_ptr, w_ptr, pad_ptr, stats_ptr, block_max_ptr,
    sqb, sqh, sql, skb, skh, skl, spb,
    heads, length, d, m, num_blocks, eps, half_inv_sqrt_d,
    TUNE_LENGTH, BT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of BT positions of one row: grid (blocks, rows). Writes stats (4, N, L):
    r, qsum = sum_f Q''_f, kmax, g; and block_max (N, blocks), the max of g over the block."""
    block = tl.program_id(0)
    row = tl.program_id(1)
    offs_l = block * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BLOCK_D)
    inside = offs_l < length
    valid = _valid(pad_ptr, row, heads, spb, offs_l, length, HAS_MASK)
    q = _load_tile(_row_base(q_ptr, row, heads, sqb, sqh), offs_l, sql, offs_d, d, inside)
    plane = row.to(tl.int64) * length + offs_l  # (N, L) planes of stats_ptr
    size = tl.num_programs(1).to(tl.int64) * length
    if SOFTMAX:
        k = _load_tile(_row_base(k_ptr, row, heads, skb, skh), offs_l, skl, offs_d, d, inside)
        r = tl.full([BT], float("-inf"), tl.float32)
        total = tl.zeros([BT], tl.float32)
        kmax = tl.full([BT], float("-inf"), tl.float32)
        for f0 in range(0, BLOCK_M, BK):
            features = (f0 + tl.arange(0, BK)) < m
            ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            ql = tl.where(features[None, :], ql, float("-inf"))
            r_new = tl.maximum(r, tl.max(ql, axis=1))  # an online max, as flash attention's
            total = total * tl.exp(r - r_new) + tl.sum(tl.exp(ql - r_new[:, None]), axis=1)
            r = r_new
            kl = _project(k, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            kmax = tl.maximum(kmax, tl.max(tl.where(features[None, :], kl, float("-inf")), axis=1))
        g = kmax - tl.sum(k * k, axis=1) * half_inv_sqrt_d
        g = tl.where(valid, g, float("-inf"))
        tl.store(stats_ptr + plane, r, mask=inside)
        tl.store(stats_ptr + size + plane, total + m * eps, mask=inside)
        tl.store(stats_ptr + 2 * size + plane, kmax, mask=inside)
        tl.store(stats_ptr + 3 * size + plane, g, mask=inside)
        tl.store(block_max_ptr + row.to(tl.int64) * num_blocks + block, tl.max(g, axis=0))
    else:
        total = tl.zeros([BT], tl.float32)
        for f0 in range(0, BLOCK_M, BK):
            features = (f0 + tl.arange(0, BK)) < m
            ql = _project(q, w_ptr, f0, d, m, BLOCK_D, BK, HAS_W, PRECISION)
            total += tl.sum(tl.where(features[None, :], tl.maximum(ql, 0.0), 0.0), axis=1)
        tl.store(stats_ptr + size + plane, total + m * eps, mask=inside)


class Problem:
    """The sizes, tiles and flags one FAVOR+ call shares among its kernels.

    q, k, v (B, H, L, d) in any float dtype and strides (last dimension contiguous); w (d, m)
    float32 or None; key_padding_mask (B, L) bool or None (True at padding).
    """

    def __init__(self, q, k, v, w, key_padding_mask, softmax: bool, eps: float, chunk: int):
        self.batch, self.heads, self.length, self.d = q.shape
        self.rows = self.batch * self.heads
        if self.rows > 65535:  # the rows are the second axis of the per-chunk grids
            raise ValueError(f"the Triton kernels take up to 65,535 batch x heads, got {self.rows}")
        self.softmax, self.eps = softmax, float(eps)
        self.has_w = w is not None
        self.m = w.shape[1] if self.has_w else self.d
        self.block_d = next_power_of_2(self.d)
        if self.block_d > 256:
            raise ValueError(f"the Triton kernels take head dims up to 256, got {self.d}")
        self.block_m = next_power_of_2(self.m) if self.has_w else self.block_d
        self.bk = min(FEATURE_TILE, self.block_m) if self.has_w else self.block_d
        self.bk_small = min(SMALL_FEATURE_TILE, self.block_m) if self.has_w else self.block_d
        self.chunk = int(chunk)
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        self.chunks = triton.cdiv(self.length, self.chunk)
        self.tune_length = tune_length(self.length)
        self.precision = dot_precision()
        self.half_inv_sqrt_d = 0.5 / self.d**0.5
        self.has_mask = key_padding_mask is not None
        # bool -> uint8 is a view (one byte each): no copy, no launch.
        mask = key_padding_mask
        self.pad = mask.to(torch.bool).contiguous().view(torch.uint8) if self.has_mask else q
        self.pad_stride = self.pad.stride(0) if self.has_mask else 0
        self.w = w if self.has_w else q  # any pointer: never read without a projection

    def flags(self) -> dict:
        """The constexpr arguments every kernel takes."""
        return dict(
            BLOCK_D=self.block_d, BLOCK_M=self.block_m, SOFTMAX=self.softmax,
            HAS_W=self.has_w, HAS_MASK=self.has_mask, PRECISION=self.precision,
        )  # fmt: skip

    def empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.pad.device


def on_input_device(method):
    """Run an autograd Function's forward or backward with its first tensor's GPU current:
    Triton launches on the current device, which need not be the tensors' (several GPUs)."""

    @functools.wraps(method)
    def run(ctx, *args):
        tensor = next(x for x in args if isinstance(x, torch.Tensor))
        if not tensor.is_cuda:
            return method(ctx, *args)
        with torch.cuda.device(tensor.device):
            return method(ctx, *args)

    return run


def strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of a (B, H, L, d) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows are contiguous (any other strides are fine), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def feature_stats(problem: Problem, q: torch.Tensor, k: torch.Tensor):
    """Per-position statistics: q, k (B, H, L, d) -> stats (4, N, L) float32 = (r, qsum, kmax,
    g) and block_max (N, L / chunk), the max of g over each chunk of positions.

    qsum = sum_f Q''_f (m * eps included); for ReLU only qsum is written. One launch."""
    p = problem
    stats = p.empty(4, p.rows, p.length)
    block_max = p.empty(p.rows, p.chunks)
    _stats_kernel[(p.chunks, p.rows)](
        q, k, p.w, p.pad, stats, block_max,
        *strides(q), *strides(k), p.pad_stride,
        p.heads, p.length, p.d, p.m, p.chunks, p.eps, p.half_inv_sqrt_d,
        p.tune_length, BT=p.chunk, BK=p.bk, **p.flags(),
    )  # fmt: skip
    return stats, block_max
