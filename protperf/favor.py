"""Fused FAVOR+ attention kernels (bidirectional and causal) with hand-written backward passes.

Why this exists: autograd through the plain formulation keeps every L x m intermediate
(projections, exponentials, stabilisers, features with the stabiliser added) and allocates a fresh
one per operation, which on a CPU costs more in page faults and memory traffic than in arithmetic.
Here the feature exponentials are computed in place; the stabiliser eps, the key norms, the
normaliser and the key scales are folded into small L x (d+1) or m x (d+1) products; and the causal
kernel works on blocks of batch-and-head rows, recomputing a block's features in the backward
instead of storing them.

Notation (per batch-and-head row; the leading dimension N = batch * heads):
    q, k, v   (N, L, d)     inputs;   W (d, m): the projection (already scaled by d^-1/4 for softmax)
    E_q       (N, L, m)     query features without the stabiliser
    Ê_k, g    (N, L, m), (N, L, 1)   key features and their log-scales: a key's feature is
                            Ê_k exp(g - M) for a reference M (zero and -inf at padded keys)
    Q'' = E_q + eps,  K'' = Ê_k exp(g - M) + eps * valid      the features of the official code
    V~ = [v, 1]  (N, L, d+1)                       the last output column is the normaliser
    out_i = sum_j (Q''_i . K''_j) V~_j  (j <= i when causal),   result = out / out[:, d]

Softmax: E_q = exp(qW - max_j (qW)_j), Ê_k = exp(kW - max_j (kW)_j), g = max_j (kW)_j - |k|^2/(2 sqrt d),
so that Ê_k exp(g) = exp(kW - |k|^2/(2 sqrt d)), the FAVOR+ positive feature up to m^-1/2. The
per-position maxima and M cancel between numerator and normaliser and are constants in the
backward (the official code's stop_gradient).
* Bidirectional: M is the max of g over the row's valid keys (as the official code).
* Causal: query i uses M_i = max of g over the keys j <= i, so that its output depends on the past
  alone, in value as well as in gradient, and equals the token-by-token recurrence
  (``FastAttention.step``), which can only know the past. Every scale exp(g_j - M_i) is <= 1.
ReLU (generalized): E = ReLU(xW), or ReLU(x) without a projection; no scales; eps = 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Exponents below the floor give exactly 0 instead of a subnormal float. x86 CPUs compute on
#: subnormals 4-10x slower, and a trained softmax model's features span enough orders of magnitude
#: to produce them: causal attention at q, k norms 10x those at initialisation ran 5x slower
#: (single thread: 285 ms, 72 ms with flush-to-zero). The protperf command also turns on the CPU's
#: flush-to-zero (protperf.runtime.flush_denormals); this floor keeps the kernels fast without it,
#: in any program that imports them. e^-25 is 1e-5 of the eps that every feature carries,
#: so dropping smaller values changes no output measurably. float64 keeps values to e^-200 (the
#: exactness tests compare with a naive reference to 1e-10).
EXP_FLOOR = {torch.float64: -200.0}
DEFAULT_EXP_FLOOR = -25.0


def flush_exp_(x: Tensor) -> Tensor:
    """exp in place, entries at or below the dtype's floor set to exactly 0 (never subnormal).

    Callers pass fresh temporaries (differences of maxima, logits), so no copy is made. Three
    streaming passes, none of which meets a subnormal: clamp the exponents a little below the
    floor (so that exp stays a normal float), exp, then zero what is at most exp(floor); NaN
    stays NaN. The earlier form (compare, masked_fill with -inf, exp) built a boolean mask and
    cost 2-4x as much: 26-55 ms against 13 ms on an (8, 8192, 256) float32 tensor."""
    floor = EXP_FLOOR.get(x.dtype, DEFAULT_EXP_FLOOR)
    return torch.nn.functional.threshold_(x.clamp_min_(floor - 5.0).exp_(), math.exp(floor), 0.0)


class FeatureMap:
    """How E_q and E_k are formed from (q, k) and how gradients flow back through them.

    ``eps`` is the stabiliser added to every feature (the official code's numerical_stabilizer).
    """

    default_eps: float

    def __init__(self, eps: float | None = None) -> None:
        self.eps = self.default_eps if eps is None else float(eps)

    def queries(self, q: Tensor, w: Tensor | None) -> Tensor:
        """(N, L, d) -> E_q (N, L, m)."""
        raise NotImplementedError

    def keys(
        self, k: Tensor, w: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """(N, L, d) -> Ê_k (N, L, m), zero where ``valid`` (N, L, 1) is False, and the log-scales
        g (N, L, 1), -inf where invalid (None: every key has scale 1)."""
        raise NotImplementedError

    def query_grad(self, grad: Tensor, features: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
        """dE_q (N, L, m, overwritten) -> dq (N, L, d)."""
        raise NotImplementedError

    def key_grad(
        self,
        grad: Tensor,
        features: Tensor,
        k: Tensor,
        w: Tensor | None,
        grad_log_scale: Tensor | None,
    ) -> Tensor:
        """dÊ_k (N, L, m, overwritten) and dg (N, L, 1) -> dk (N, L, d)."""
        raise NotImplementedError


class SoftmaxFeatures(FeatureMap):
    """FAVOR+ positive random features of exp(q.k / sqrt(d)); ``w`` is W^T d^-1/4, (d, m)."""

    default_eps = 1e-6

    def queries(self, q: Tensor, w: Tensor | None) -> Tensor:
        logits = torch.matmul(q, w)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        return flush_exp_(logits)

    def keys(
        self, k: Tensor, w: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        logits = torch.matmul(k, w)
        row_max = logits.amax(dim=-1, keepdim=True)
        features = flush_exp_(logits.sub_(row_max))
        log_scale = row_max - k.pow(2).sum(dim=-1, keepdim=True) * (0.5 / math.sqrt(k.shape[-1]))
        if valid is not None:
            features.masked_fill_(~valid, 0.0)
            log_scale.masked_fill_(~valid, -math.inf)
        return features, log_scale

    def query_grad(self, grad: Tensor, features: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
        return torch.matmul(grad.mul_(features), w.T)

    def key_grad(
        self,
        grad: Tensor,
        features: Tensor,
        k: Tensor,
        w: Tensor | None,
        grad_log_scale: Tensor | None,
    ) -> Tensor:
        # g = max(kW) - |k|^2 / (2 sqrt d), the max being a constant: dg/dk = -k / sqrt d.
        grad_k = torch.matmul(grad.mul_(features), w.T)
        return grad_k.sub_(grad_log_scale * k * (1.0 / math.sqrt(k.shape[-1])))


class ReluFeatures(FeatureMap):
    """The generalized kernel's features ReLU(x W), or ReLU(x) when ``w`` is None."""

    default_eps = 1e-3

    def queries(self, q: Tensor, w: Tensor | None) -> Tensor:
        return torch.matmul(q, w).relu_() if w is not None else q.clamp(min=0)

    def keys(
        self, k: Tensor, w: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        features = self.queries(k, w)
        return (features if valid is None else features.masked_fill_(~valid, 0.0)), None

    def query_grad(self, grad: Tensor, features: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
        # ReLU's own backward (zero where the feature is <= 0), one fused pass: a boolean mask
        # and masked_fill_ cost 10x as much on a CPU (3.0 against 0.28 ms on (4, 8192, 32)).
        grad = torch.ops.aten.threshold_backward(grad, features, 0.0)
        return torch.matmul(grad, w.T) if w is not None else grad

    def key_grad(
        self,
        grad: Tensor,
        features: Tensor,
        k: Tensor,
        w: Tensor | None,
        grad_log_scale: Tensor | None,
    ) -> Tensor:
        return self.query_grad(grad, features, k, w)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"softmax": SoftmaxFeatures, "relu": ReluFeatures}


def _values_with_ones(v: Tensor) -> Tensor:
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


#: On a CPU, glibc serves a block of 32 MB or more with a fresh mmap (page-faulted anew on every
#: use) whatever the settings; rows go in blocks whose L x m tensors stay strictly under that, so
#: that the allocator recycles them (see protperf.runtime). A row larger than the budget is a
#: block of its own.
BLOCK_BYTES = {"cpu": 31 << 20, "cuda": 1 << 30}
#: Budget for the features of all rows of one call (two L x m tensors per row): within it they
#: are kept for the backward; beyond it the backward recomputes them block by block.
KEEP_FEATURES_BYTES = {"cpu": 512 << 20, "cuda": 2 << 30}


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


class BidirectionalFavor(torch.autograd.Function):
    """out = D^-1 Q''(K''^T V~): q, k, v (N, L, d) -> (N, L, d).

    ``apply(q, k, v, w, valid, feature_map)``: w (d, m) or None, valid (N, L, 1) bool or None.
    The key scales exp(g - M) multiply the values (N x L x (d+1)), not the features. Rows go in
    blocks and, when a single row's features exceed the block budget, in position segments: the
    context C is then summed over segments with M raised as it grows (C rescaled by
    exp(M_old - M_new) <= 1), so that it ends at the row's M as in one piece.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, valid, feature_map: FeatureMap):
        eps = feature_map.eps
        rows, length = q.shape[:2]
        values = _values_with_ones(v)
        num_features = w.shape[1] if w is not None else q.shape[-1]
        context = values.new_zeros(rows, num_features, values.shape[-1])
        out = torch.empty_like(values)
        blocks, keep = _row_blocks(rows, length, num_features, q.device)
        keep = keep and any(ctx.needs_input_grad[:3])  # inference keeps nothing
        kept, log_scales, references = [], [], []
        floor = torch.finfo(q.dtype).min
        for block in blocks:
            segments = _segments(length, block.stop - block.start, num_features, q.device)
            block_context = context[block]
            reference, block_log_scales = None, []
            for segment in segments:
                seg_valid = None if valid is None else valid[block, segment]
                ek, log_scale = feature_map.keys(k[block, segment], w, seg_valid)
                seg_values = values[block, segment]
                if log_scale is not None:  # raise M to this segment's max, rescale C to it
                    top = log_scale.amax(dim=-2, keepdim=True).clamp_min(floor)
                    if reference is not None:
                        top = torch.maximum(reference, top)
                        block_context.mul_(flush_exp_(reference - top))
                    reference = top
                    seg_values = seg_values * flush_exp_(log_scale - reference)
                # C += Ê_k^T (scale V~)                                            (R, m, d+1)
                block_context.baddbmm_(ek.transpose(-2, -1), seg_values)
                block_log_scales.append(log_scale)
                if keep:
                    kept.append(ek)
            # C = K''^T V~ = Ê_k^T (scale V~) + eps * sum_l valid_l V~_l
            valid_values = values[block] if valid is None else values[block] * valid[block]
            block_context.add_(valid_values.sum(dim=-2, keepdim=True), alpha=eps)
            context_total = block_context.sum(dim=-2, keepdim=True)
            for segment in segments:
                # out = Q'' C = E_q C + eps * sum_j C_j
                eq = feature_map.queries(q[block, segment], w)
                torch.matmul(eq, block_context, out=out[block, segment])
                out[block, segment].add_(context_total, alpha=eps)
                if keep:
                    kept.append(eq)
            log_scales.append(block_log_scales)
            references.append(reference)
        normalised, denominator = _normalise(out)
        ctx.save_for_backward(q, k, w, values, context, normalised, denominator, valid)
        ctx.feature_map, ctx.kept = feature_map, (kept if keep else None)
        ctx.log_scales, ctx.references = log_scales, references  # small: (R, L, 1), (R, 1, 1)
        return normalised

    @staticmethod
    def backward(ctx, grad):
        q, k, w, values, context, normalised, denominator, valid = ctx.saved_tensors
        feature_map = ctx.feature_map
        eps = feature_map.eps
        rows, length = q.shape[:2]
        num_features = context.shape[1]
        grad_out = _output_gradient(grad, normalised, denominator)  # (N, L, d+1)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(grad)
        blocks, _ = _row_blocks(rows, length, num_features, q.device)
        kept = iter(ctx.kept) if ctx.kept is not None else None
        for index, block in enumerate(blocks):
            segments = _segments(length, block.stop - block.start, num_features, q.device)
            features = [next(kept) for _ in range(2 * len(segments))] if kept else None
            reference, block_context = ctx.references[index], context[block]
            # dC = Q''^T dOut, summed over the segments (one row's queries at most: held for
            # the loop below rather than computed twice)
            queries = (
                features[len(segments) :]
                if features
                else [feature_map.queries(q[block, segment], w) for segment in segments]
            )
            grad_context = torch.zeros_like(block_context)
            for eq, segment in zip(queries, segments, strict=True):
                grad_context.baddbmm_(eq.transpose(-2, -1), grad_out[block, segment])
            grad_context.add_(grad_out[block].sum(dim=-2, keepdim=True), alpha=eps)
            eps_term = grad_context.sum(dim=-2, keepdim=True) * eps
            for position, segment in enumerate(segments):
                seg_valid = None if valid is None else valid[block, segment]
                log_scale = ctx.log_scales[index][position]
                eq = queries[position]
                if features:
                    ek = features[position]
                else:
                    ek, _ = feature_map.keys(k[block, segment], w, seg_valid)
                seg_grad, seg_values = grad_out[block, segment], values[block, segment]
                grad_eq = torch.matmul(seg_grad, block_context.transpose(-2, -1))
                grad_q[block, segment] = feature_map.query_grad(grad_eq, eq, q[block, segment], w)
                # Keys: dÊ_k = (scale V~) dC^T;  H = Ê_k dC gives dV~ and d(scale).
                scale = None if log_scale is None else flush_exp_(log_scale - reference)
                scaled_values = seg_values if scale is None else seg_values * scale
                grad_ek = torch.matmul(scaled_values, grad_context.transpose(-2, -1))
                through_keys = torch.matmul(ek, grad_context)  # (R, S, d+1)
                grad_log_scale = None
                if scale is not None:
                    grad_log_scale = (through_keys * seg_values).sum(dim=-1, keepdim=True)
                    grad_log_scale.mul_(scale)
                    through_keys.mul_(scale)
                grad_k[block, segment] = feature_map.key_grad(
                    grad_ek, ek, k[block, segment], w, grad_log_scale
                )
                through_keys.add_(eps_term if seg_valid is None else eps_term * seg_valid)
                grad_v[block, segment] = through_keys[..., :-1]
        return grad_q, grad_k, grad_v, None, None, None


@dataclass
class _ChunkedFeatures:
    """One block of R rows of causal FAVOR+, in n chunks of C positions.

    eq, ek (R, n, C, m); valid (R, n, C, 1) float or None. With key scales (softmax):
    query_scale (R, n, C, 1) = exp(M_prev - M_i), key_scale (R, n, C, 1) = exp(g_j - M_chunk),
    chunk_max, previous_max (R, n) = M_chunk, M_prev, where M_i is the running max of g up to
    i, M_chunk its value at the chunk's end and M_prev at the previous chunk's end. decay
    (R, n, C, C) = exp(g_j - M_i) for j <= i, else 0 (the lower triangle of ones without scales).
    """

    eq: Tensor
    ek: Tensor
    log_scale: Tensor | None
    valid: Tensor | None
    query_scale: Tensor | None
    key_scale: Tensor | None
    chunk_max: Tensor | None
    previous_max: Tensor | None
    decay: Tensor

    def intra_attention(self, scores: Tensor, query_total: Tensor, eps: float) -> Tensor:
        """A = lower triangle of decay * X + eps (rowsum E_q + m eps) valid^T: (R, n, C, C)."""
        attention = self.decay * scores
        if self.valid is None:
            attention.add_(query_total, alpha=eps)
        else:
            attention.addcmul_(query_total, self.valid.transpose(-2, -1), value=eps)
        return attention.tril_()


def _chunked_features(
    feature_map: FeatureMap,
    q: Tensor,
    k: Tensor,
    w: Tensor | None,
    valid: Tensor | None,
    chunk: int,
    initial_max: Tensor | None = None,
) -> _ChunkedFeatures:
    """Features and causal scales of a block of rows: q, k (R, L, d), valid (R, L, 1) or None.

    ``initial_max`` (R,): the running max of g before these positions (a later segment of the
    rows: the previous segment's last chunk_max); None at the start of the rows.
    """
    rows, length = q.shape[:2]
    n = length // chunk
    eq = feature_map.queries(q, w).view(rows, n, chunk, -1)
    ek, log_scale = feature_map.keys(k, w, valid)
    ek = ek.view(rows, n, chunk, -1)
    valid_c = None if valid is None else valid.view(rows, n, chunk, 1).to(q.dtype)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril_()
    if log_scale is None:
        decay = lower.to(q.dtype).expand(rows, n, chunk, chunk)
        return _ChunkedFeatures(eq, ek, None, valid_c, None, None, None, None, decay)
    floor = torch.finfo(q.dtype).min / 4  # "no valid key yet": finite, so floor - floor = 0
    g = log_scale.view(rows, length)
    running_max = torch.cummax(g.clamp_min(floor), dim=-1).values
    if initial_max is None:
        initial_max = g.new_full((rows,), floor)
    else:
        running_max = torch.maximum(running_max, initial_max.unsqueeze(-1))
    running_max = running_max.view(rows, n, chunk)
    chunk_max = running_max[..., -1]  # (R, n)
    previous_max = torch.cat([initial_max.unsqueeze(-1), chunk_max[:, :-1]], dim=1)
    g = g.view(rows, n, chunk)
    exponent = g.unsqueeze(-2) - running_max.unsqueeze(-1)  # (R, n, C_i, C_j): g_j - M_i
    decay = flush_exp_(exponent.masked_fill_(~lower, -math.inf))
    return _ChunkedFeatures(
        eq,
        ek,
        g,
        valid_c,
        query_scale=flush_exp_(previous_max.unsqueeze(-1) - running_max).unsqueeze(-1),
        key_scale=flush_exp_(g - chunk_max.unsqueeze(-1)).unsqueeze(-1),
        chunk_max=chunk_max,
        previous_max=previous_max,
        decay=decay,
    )


def _bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Batched matmul over (R, n, x, y) tensors, through 3-D views."""
    result = torch.bmm(
        a.flatten(0, 1), b.flatten(0, 1), out=None if out is None else out.flatten(0, 1)
    )
    return result.view(*a.shape[:2], *result.shape[1:])


def _bmm_add_(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out += a @ b in place, over (R, n, x, y) tensors."""
    out.flatten(0, 1).baddbmm_(a.flatten(0, 1), b.flatten(0, 1))
    return out


#: Chunks per group of the state scan: one matmul within a group, a loop across groups.
SCAN_GROUP = 32


def _scan_states(
    increments: Tensor,
    chunk_max: Tensor | None,
    previous_max: Tensor | None,
    reverse: bool = False,
) -> Tensor:
    """Sums of chunk increments carried across chunks, rescaled to each chunk's reference.

    increments (R, n, m, f): chunk c's contribution, at the scale exp(-chunk_max[c]) (forward)
    or exp(-previous_max[c]) (reverse); previous_max (R, n) is chunk_max shifted by one chunk
    (the scale of the state entering a chunk). None for both: no scales. Returns (R, n, m, f):
        forward: out[c] = sum_{c' < c} exp(chunk_max[c'] - previous_max[c]) increments[c']
        reverse: out[c] = sum_{c' > c} exp(chunk_max[c] - previous_max[c']) increments[c']
    Every factor is <= 1 (the maxima never decrease). Instead of n dependent updates (slow
    small operations on a CPU), groups of SCAN_GROUP chunks are summed by one batched matmul
    with their (G x G) factor matrices, and only the n / G group totals are carried in a loop.
    """
    rows, n = increments.shape[:2]
    if chunk_max is None:
        chunk_max = previous_max = increments.new_zeros(rows, n)
    group = min(SCAN_GROUP, n)
    groups = -(-n // group)
    flat = increments.reshape(rows, n, -1)
    if groups * group != n:  # pad: zero increments, maxima repeated (finite factors)
        extra = groups * group - n
        flat = torch.cat([flat, flat.new_zeros(rows, extra, flat.shape[-1])], dim=1)
        edge = chunk_max[:, -1:].expand(rows, extra)
        chunk_max = torch.cat([chunk_max, edge], dim=1)
        previous_max = torch.cat([previous_max, edge], dim=1)
    flat = flat.view(rows, groups, group, -1)
    chunk_max = chunk_max.view(rows, groups, group)
    previous_max = previous_max.view(rows, groups, group)
    first_previous = previous_max[..., :1]  # (R, groups, 1): the scale entering each group
    last_max = chunk_max[..., -1:]  # (R, groups, 1): the scale at each group's end
    if reverse:
        exponent = chunk_max.unsqueeze(-1) - previous_max.unsqueeze(-2)  # [i, j] = cm_i - pm_j
        keep = torch.ones(group, group, dtype=torch.bool, device=flat.device).triu_(1)
        to_total = first_previous - previous_max  # totals at the scale entering the group
        carry = (first_previous - last_max)[:, 1:]  # leaving g+1 -> leaving g
        to_out = chunk_max - last_max
    else:
        exponent = chunk_max.unsqueeze(-2) - previous_max.unsqueeze(-1)  # [i, j] = cm_j - pm_i
        keep = torch.ones(group, group, dtype=torch.bool, device=flat.device).tril_(-1)
        to_total = chunk_max - last_max  # totals at the scale of the group's end
        carry = (first_previous - last_max)[:, :-1]  # entering g -> entering g+1
        to_out = first_previous - previous_max
    out = _bmm(flush_exp_(exponent.masked_fill_(~keep, -math.inf)), flat)  # within each group
    totals = _bmm(flush_exp_(to_total).unsqueeze(-2), flat).squeeze(2)  # (R, groups, m*f)
    carried = torch.zeros_like(totals)  # entering (forward) / leaving (reverse) each group
    carry = flush_exp_(carry)
    steps = range(groups - 1, 0, -1) if reverse else range(groups - 1)
    for index in steps:
        source, target = (index, index - 1) if reverse else (index, index + 1)
        partial = totals[:, target + 1] if reverse else totals[:, source]
        torch.addcmul(
            partial, carry[:, min(source, target)], carried[:, source], out=carried[:, target]
        )
    out.addcmul_(flush_exp_(to_out).unsqueeze(-1), carried.unsqueeze(2))
    return out.view(rows, groups * group, *increments.shape[2:])[:, :n]


def _exclusive_sum(x: Tensor, reverse: bool = False) -> Tensor:
    """Sum over the chunks strictly before (after) each chunk: x (R, n, 1, f), small."""
    zero = torch.zeros_like(x[:, :1])
    if reverse:
        return torch.cat([x.flip(1).cumsum(1).flip(1)[:, 1:], zero], dim=1)
    # A shift, not cumsum - x: rounding would then depend on the chunk itself.
    return torch.cat([zero, x.cumsum(1)[:, :-1]], dim=1)


class CausalFavor(torch.autograd.Function):
    """out_i = sum_{j<=i} (Q''_i . K''_j) V~_j, normalised, in chunks of C: (N, L, d) -> (N, L, d).

    ``apply(q, k, v, w, valid, feature_map, chunk)``; L must be a multiple of ``chunk`` (the
    caller pads, marking the extra keys invalid). Within a chunk the masked C x C scores are
    formed; across chunks a carried state (m x (d+1) per chunk) holds the past. Kept for the
    backward: the L/C states, the L x C scores and, within KEEP_FEATURES_BYTES, the L x m
    features (else recomputed block by block). No L x m x d tensor is ever formed. A row whose
    features exceed the block budget goes in segments of whole chunks, the state (and the
    running max of the key scales) carried from one segment to the next, and back in the
    backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, valid, feature_map: FeatureMap, chunk: int):
        rows, length = q.shape[:2]
        n = length // chunk
        values = _values_with_ones(v)
        num_features = w.shape[1] if w is not None else q.shape[-1]
        scores = values.new_empty(rows, n, chunk, chunk)
        out = torch.empty_like(values)
        blocks, keep = _row_blocks(rows, length, num_features, q.device)
        keep = keep and any(ctx.needs_input_grad[:3])  # inference keeps nothing
        kept, states, starts = [], [], []
        for block in blocks:
            # Several segments only for a block of one row (a block of several fits the budget),
            # so that the views below of one row's chunks stay contiguous.
            segments = _segments(n, block.stop - block.start, num_features * chunk, q.device)
            carry, initial_max, block_states, block_starts = None, None, [], []
            for segment in segments:
                positions = slice(segment.start * chunk, segment.stop * chunk)
                features = _chunked_features(
                    feature_map, q[block, positions], k[block, positions], w,
                    None if valid is None else valid[block, positions], chunk, initial_max,
                )  # fmt: skip
                shape = (-1, segment.stop - segment.start, chunk, values.shape[-1])
                values_before = None if carry is None else carry[1]
                segment_states, carry = _causal_forward_block(
                    features, values[block, positions].view(shape), feature_map.eps,
                    scores[block, segment], out[block, positions].view(shape), carry,
                )  # fmt: skip
                block_states.append((segment_states, values_before))
                block_starts.append(initial_max)
                if features.chunk_max is not None:
                    initial_max = features.chunk_max[:, -1]
                if keep:
                    kept.append(features)
            states.append(block_states)
            starts.append(block_starts)
        normalised, denominator = _normalise(out)
        ctx.save_for_backward(q, k, w, values, scores, normalised, denominator, valid)
        ctx.feature_map, ctx.chunk, ctx.kept = feature_map, chunk, (kept if keep else None)
        # Per block and segment: states (R, n_s, m, d+1) and the sum of valid values before it
        # (R, 1, d+1) or None; the running max entering it (R,) or None.
        # Internal, so not save_for_backward.
        ctx.states, ctx.starts = states, starts
        return normalised

    @staticmethod
    def backward(ctx, grad):
        q, k, w, values, scores, normalised, denominator, valid = ctx.saved_tensors
        feature_map, chunk = ctx.feature_map, ctx.chunk
        rows, length = q.shape[:2]
        n = length // chunk
        grad_out = _output_gradient(grad, normalised, denominator)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(grad)
        num_features = w.shape[1] if w is not None else q.shape[-1]
        blocks, _ = _row_blocks(rows, length, num_features, q.device)
        kept = iter(ctx.kept) if ctx.kept is not None else None
        for index, block in enumerate(blocks):
            segments = _segments(n, block.stop - block.start, num_features * chunk, q.device)
            block_kept = [next(kept) for _ in segments] if kept is not None else None
            carry = None
            for position in reversed(range(len(segments))):  # the later segments' gradient first
                segment = segments[position]
                positions = slice(segment.start * chunk, segment.stop * chunk)
                if block_kept is not None:
                    features = block_kept[position]
                else:
                    features = _chunked_features(
                        feature_map, q[block, positions], k[block, positions], w,
                        None if valid is None else valid[block, positions], chunk,
                        ctx.starts[index][position],
                    )  # fmt: skip
                shape = (-1, segment.stop - segment.start, chunk, values.shape[-1])
                segment_states, values_before = ctx.states[index][position]
                grad_eq, grad_ek, grad_log_scale, grad_values, carry = _causal_backward_block(
                    features, values[block, positions].view(shape),
                    grad_out[block, positions].view(shape), segment_states,
                    scores[block, segment], feature_map.eps, carry, values_before,
                )  # fmt: skip
                flat = (-1, positions.stop - positions.start, grad_eq.shape[-1])
                grad_q[block, positions] = feature_map.query_grad(
                    grad_eq.view(flat), features.eq.view(flat), q[block, positions], w
                )
                grad_k[block, positions] = feature_map.key_grad(
                    grad_ek.view(flat), features.ek.view(flat), k[block, positions], w,
                    None if grad_log_scale is None else grad_log_scale.view(*flat[:2], 1),
                )  # fmt: skip
                grad_v[block, positions] = grad_values.view(*flat[:2], values.shape[-1])[..., :-1]
        return grad_q, grad_k, grad_v, None, None, None, None


def _causal_forward_block(
    f: _ChunkedFeatures,
    values: Tensor,
    eps: float,
    scores: Tensor,
    out: Tensor,
    carry: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Forward of :class:`CausalFavor` for one block (or segment), writing into its outputs.

    values (R, n, C, d+1). Returns ``states`` (R, n, m, d+1): the state entering each chunk,
    S_c = sum_{j before chunk c} Ê_j^T exp(g_j - M_prev) V~_j; ``scores`` (R, n, C, C):
    X = E_q Ê_k^T + eps rowsum(Ê_k) (before the decay); ``out`` (R, n, C, d+1): numerator and
    normaliser. ``carry`` in and out: the state after the positions so far (R, m, d+1), at the
    scale of their last chunk_max, and the sum of their valid values (R, 1, d+1).
    """
    num_features = f.eq.shape[-1]
    scaled_values = values if f.key_scale is None else values * f.key_scale
    increments = _bmm(f.ek.transpose(-2, -1), scaled_values)  # (R, n, m, d+1)
    states = _scan_states(increments, f.chunk_max, f.previous_max)
    valid_values = values if f.valid is None else values * f.valid
    value_sums = valid_values.sum(dim=-2, keepdim=True)  # (R, n, 1, d+1)
    past_values = _exclusive_sum(value_sums)
    if carry is not None:  # the earlier segments: their state, rescaled to each chunk's entry
        carried_state, carried_values = carry
        if f.previous_max is None:
            states.add_(carried_state.unsqueeze(1))
        else:
            factor = flush_exp_(f.previous_max[:, :1] - f.previous_max)[..., None, None]
            states.addcmul_(factor, carried_state.unsqueeze(1))
        past_values.add_(carried_values.unsqueeze(1))
    last_state = states[:, -1]
    if f.chunk_max is not None:
        last_state = (
            last_state * flush_exp_(f.previous_max[:, -1] - f.chunk_max[:, -1])[:, None, None]
        )
    carry = (last_state + increments[:, -1], past_values[:, -1] + value_sums[:, -1])
    # Intra-chunk scores: decay * (E_q Ê^T + eps rowsum Ê) + eps (rowsum E_q + m eps) valid.
    _bmm(f.eq, f.ek.transpose(-2, -1), out=scores)
    scores.add_(f.ek.sum(dim=-1).unsqueeze(-2), alpha=eps)
    query_total = f.eq.sum(dim=-1, keepdim=True).add_(num_features * eps)  # (R, n, C, 1)
    attention = f.intra_attention(scores, query_total, eps)
    # Past chunks, through the carried state, and the stabiliser's share of past values.
    _bmm(f.eq, states, out=out).add_(states.sum(dim=-2, keepdim=True), alpha=eps)
    if f.query_scale is not None:
        out.mul_(f.query_scale)
    out.addcmul_(query_total, past_values, value=eps)
    _bmm_add_(out, attention, values)
    return states, carry


def _causal_backward_block(
    f: _ChunkedFeatures,
    values: Tensor,
    grad_out: Tensor,
    states: Tensor,
    scores: Tensor,
    eps: float,
    carry: tuple[Tensor, Tensor] | None = None,
    values_before: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, tuple[Tensor, Tensor]]:
    """Backward of :class:`CausalFavor` for one block (or segment, the later ones first).

    values, grad_out (R, n, C, d+1); states (R, n, m, d+1); scores (R, n, C, C) as the forward
    wrote them. Returns dE_q, dÊ_k (R, n, C, m), dg (R, n, C) or None, dV~ (R, n, C, d+1) and the
    carry for the segment before: the gradient of the state entering this one (R, m, d+1), at
    the scale of its previous_max, and of the sum of the valid values before it (R, 1, d+1);
    ``carry`` in: the same from the segment after; ``values_before`` (R, 1, d+1): the sum of
    the valid values of the segments before (None: none).
    """
    num_features = f.eq.shape[-1]
    query_total = f.eq.sum(dim=-1, keepdim=True).add_(num_features * eps)
    attention = f.intra_attention(scores, query_total, eps)
    # Intra-chunk: B = dOut V~^T (lower triangle); through the decay, B' = B * decay.
    b = _bmm(grad_out, values.transpose(-2, -1)).tril_()
    b_decayed = b * f.decay
    grad_eq = _bmm(b_decayed, f.ek)
    grad_ek = _bmm(b_decayed.transpose(-2, -1), f.eq)
    grad_ek.add_(b_decayed.sum(dim=-2).unsqueeze(-1), alpha=eps)  # through rowsum(Ê) in X
    valid_b = b if f.valid is None else b * f.valid.transpose(-2, -1)
    grad_query_total = valid_b.sum(dim=-1, keepdim=True).mul_(eps)  # (R, n, C, 1)
    grad_log_scale = None if f.log_scale is None else (b_decayed * scores).sum(dim=-2)  # (R, n, C)
    grad_values = _bmm(attention.transpose(-2, -1), grad_out)
    # Past chunks, for the queries: out += query_scale (E_q S + eps colsum S) + eps qt P.
    scaled_grad = grad_out if f.query_scale is None else grad_out * f.query_scale
    _bmm_add_(grad_eq, scaled_grad, states.transpose(-2, -1))
    to_states = _bmm(f.eq.transpose(-2, -1), scaled_grad)  # dS_c from chunk c's queries
    to_states.add_(scaled_grad.sum(dim=-2, keepdim=True), alpha=eps)
    valid_values = values if f.valid is None else values * f.valid
    past_values = _exclusive_sum(valid_values.sum(dim=-2, keepdim=True))
    if values_before is not None:
        past_values.add_(values_before.unsqueeze(1))
    grad_query_total.add_((grad_out * past_values).sum(dim=-1, keepdim=True), alpha=eps)
    to_past_values = (grad_out * query_total).sum(dim=-2, keepdim=True).mul_(eps)  # (R, n, 1, d+1)
    # Later chunks, for the keys: the gradient of the state after each chunk.
    later = _scan_states(to_states, f.chunk_max, f.previous_max, reverse=True)
    later_values = _exclusive_sum(to_past_values, reverse=True)
    if carry is not None:  # the later segments, rescaled from this one's last chunk_max
        carried_later, carried_values = carry
        if f.chunk_max is None:
            later.add_(carried_later.unsqueeze(1))
        else:
            factor = flush_exp_(f.chunk_max - f.chunk_max[:, -1:])[..., None, None]
            later.addcmul_(factor, carried_later.unsqueeze(1))
        later_values.add_(carried_values.unsqueeze(1))
    first_later = later[:, 0]
    if f.chunk_max is not None:
        first_later = (
            first_later * flush_exp_(f.previous_max[:, 0] - f.chunk_max[:, 0])[:, None, None]
        )
    carry = (first_later + to_states[:, 0], later_values[:, 0] + to_past_values[:, 0])
    through_keys = _bmm(f.ek, later)  # (R, n, C, d+1)
    if f.key_scale is not None:
        grad_log_scale.add_((through_keys * values).sum(dim=-1).mul_(f.key_scale.squeeze(-1)))
        through_keys.mul_(f.key_scale)
        scaled_values = values * f.key_scale
    else:
        scaled_values = values
    grad_values.add_(through_keys)
    _bmm_add_(grad_ek, scaled_values, later.transpose(-2, -1))
    grad_values.add_(later_values if f.valid is None else later_values * f.valid)
    grad_eq.add_(grad_query_total)
    return grad_eq, grad_ek, grad_log_scale, grad_values, carry
