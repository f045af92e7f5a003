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
        return logits.exp_()

    def keys(
        self, k: Tensor, w: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        logits = torch.matmul(k, w)
        row_max = logits.amax(dim=-1, keepdim=True)
        features = logits.sub_(row_max).exp_()
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
        grad = grad.masked_fill_(features <= 0, 0.0)
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


#: On a CPU, glibc serves blocks above 32 MB with a fresh mmap (page-faulted anew on every use)
#: whatever the settings; rows go in blocks whose L x m tensors stay under that, so that the
#: allocator recycles them (see protperf.runtime).
BLOCK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}
#: Budget for the features of all rows of one call (two L x m tensors per row): within it they
#: are kept for the backward; beyond it the backward recomputes them block by block.
KEEP_FEATURES_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}


def _row_blocks(
    rows: int, length: int, num_features: int, device: torch.device
) -> tuple[list[slice], bool]:
    """Blocks of rows processed together, and whether their features are kept for the backward."""
    per_row = 4 * length * num_features  # one L x m float32 tensor
    size = max(1, BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"]) // per_row)
    keep = 2 * rows * per_row <= KEEP_FEATURES_BYTES.get(device.type, KEEP_FEATURES_BYTES["cpu"])
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)], keep


def _key_scales(log_scale: Tensor | None) -> Tensor | None:
    """exp(g - M), M the row's max over valid keys: (R, L, 1), 0 at padding (None: no scales)."""
    if log_scale is None:
        return None
    reference = log_scale.amax(dim=-2, keepdim=True).clamp_min(torch.finfo(log_scale.dtype).min)
    return torch.exp(log_scale - reference)


class BidirectionalFavor(torch.autograd.Function):
    """out = D^-1 Q''(K''^T V~): q, k, v (N, L, d) -> (N, L, d).

    ``apply(q, k, v, w, valid, feature_map)``: w (d, m) or None, valid (N, L, 1) bool or None.
    The key scales exp(g - M) multiply the values (N x L x (d+1)), not the features.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, valid, feature_map: FeatureMap):
        eps = feature_map.eps
        rows, length = q.shape[:2]
        values = _values_with_ones(v)
        num_features = w.shape[1] if w is not None else q.shape[-1]
        context = values.new_empty(rows, num_features, values.shape[-1])
        out = torch.empty_like(values)
        blocks, keep = _row_blocks(rows, length, num_features, q.device)
        kept = []
        for block in blocks:
            eq = feature_map.queries(q[block], w)
            ek, log_scale = feature_map.keys(k[block], w, None if valid is None else valid[block])
            scale = _key_scales(log_scale)
            block_values = values[block]
            scaled_values = block_values if scale is None else block_values * scale
            valid_values = block_values if valid is None else block_values * valid[block]
            # C = K''^T V~ = Ê_k^T (scale V~) + eps * sum_l valid_l V~_l      (R, m, d+1)
            torch.matmul(ek.transpose(-2, -1), scaled_values, out=context[block])
            context[block].add_(valid_values.sum(dim=-2, keepdim=True), alpha=eps)
            # out = Q'' C = E_q C + eps * sum_j C_j
            torch.matmul(eq, context[block], out=out[block])
            out[block].add_(context[block].sum(dim=-2, keepdim=True), alpha=eps)
            if keep:
                kept.append((eq, ek, scale))
        normalised, denominator = _normalise(out)
        ctx.save_for_backward(q, k, w, values, context, normalised, denominator, valid)
        ctx.feature_map, ctx.kept = feature_map, (kept if keep else None)
        return normalised

    @staticmethod
    def backward(ctx, grad):
        q, k, w, values, context, normalised, denominator, valid = ctx.saved_tensors
        feature_map = ctx.feature_map
        eps = feature_map.eps
        rows, length = q.shape[:2]
        grad_out = _output_gradient(grad, normalised, denominator)  # (N, L, d+1)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(grad)
        blocks, _ = _row_blocks(rows, length, context.shape[1], q.device)
        for index, block in enumerate(blocks):
            valid_block = None if valid is None else valid[block]
            if ctx.kept is not None:
                eq, ek, scale = ctx.kept[index]
            else:
                eq = feature_map.queries(q[block], w)
                ek, log_scale = feature_map.keys(k[block], w, valid_block)
                scale = _key_scales(log_scale)
            block_grad, block_values, block_context = grad_out[block], values[block], context[block]
            # dC = Q''^T dOut
            grad_context = torch.matmul(eq.transpose(-2, -1), block_grad)
            grad_context.add_(block_grad.sum(dim=-2, keepdim=True), alpha=eps)
            grad_eq = torch.matmul(block_grad, block_context.transpose(-2, -1))
            grad_q[block] = feature_map.query_grad(grad_eq, eq, q[block], w)
            # Keys: dÊ_k = (scale V~) dC^T;  H = Ê_k dC gives dV~ and d(scale).
            scaled_values = block_values if scale is None else block_values * scale
            grad_ek = torch.matmul(scaled_values, grad_context.transpose(-2, -1))
            through_keys = torch.matmul(ek, grad_context)  # (R, L, d+1)
            grad_log_scale = None
            if scale is not None:
                grad_log_scale = (through_keys * block_values).sum(dim=-1, keepdim=True).mul_(scale)
                through_keys.mul_(scale)
            grad_k[block] = feature_map.key_grad(grad_ek, ek, k[block], w, grad_log_scale)
            eps_term = grad_context.sum(dim=-2, keepdim=True) * eps
            through_keys.add_(eps_term if valid_block is None else eps_term * valid_block)
            grad_v[block] = through_keys[..., :-1]
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
) -> _ChunkedFeatures:
    """Features and causal scales of a block of rows: q, k (R, L, d), valid (R, L, 1) or None."""
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
    running_max = torch.cummax(g.clamp_min(floor), dim=-1).values.view(rows, n, chunk)
    chunk_max = running_max[..., -1]  # (R, n)
    previous_max = torch.cat([chunk_max.new_full((rows, 1), floor), chunk_max[:, :-1]], dim=1)
    g = g.view(rows, n, chunk)
    exponent = g.unsqueeze(-2) - running_max.unsqueeze(-1)  # (R, n, C_i, C_j): g_j - M_i
    decay = exponent.masked_fill_(~lower, -math.inf).exp_()
    return _ChunkedFeatures(
        eq,
        ek,
        g,
        valid_c,
        query_scale=torch.exp(previous_max.unsqueeze(-1) - running_max).unsqueeze(-1),
        key_scale=torch.exp(g - chunk_max.unsqueeze(-1)).unsqueeze(-1),
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
    out = _bmm(exponent.masked_fill_(~keep, -math.inf).exp_(), flat)  # within each group
    totals = _bmm(to_total.exp_().unsqueeze(-2), flat).squeeze(2)  # (R, groups, m*f)
    carried = torch.zeros_like(totals)  # entering (forward) / leaving (reverse) each group
    carry = carry.exp_()
    steps = range(groups - 1, 0, -1) if reverse else range(groups - 1)
    for index in steps:
        source, target = (index, index - 1) if reverse else (index, index + 1)
        partial = totals[:, target + 1] if reverse else totals[:, source]
        torch.addcmul(
            partial, carry[:, min(source, target)], carried[:, source], out=carried[:, target]
        )
    out.addcmul_(to_out.exp_().unsqueeze(-1), carried.unsqueeze(2))
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
    features (else recomputed block by block). No L x m x d tensor is ever formed.
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
        kept, states = [], []
        for block in blocks:
            features = _chunked_features(
                feature_map, q[block], k[block], w, None if valid is None else valid[block], chunk
            )
            shape = (-1, n, chunk, values.shape[-1])
            block_states = _causal_forward_block(
                features, values[block].view(shape), feature_map.eps, scores[block],
                out[block].view(shape),
            )  # fmt: skip
            states.append(block_states)
            if keep:
                kept.append(features)
        normalised, denominator = _normalise(out)
        ctx.save_for_backward(q, k, w, values, scores, normalised, denominator, valid)
        ctx.feature_map, ctx.chunk, ctx.kept = feature_map, chunk, (kept if keep else None)
        ctx.states = states  # per block (R, n, m, d+1); internal, so not save_for_backward
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
        for index, block in enumerate(blocks):
            if ctx.kept is not None:
                features = ctx.kept[index]
            else:
                valid_block = None if valid is None else valid[block]
                features = _chunked_features(feature_map, q[block], k[block], w, valid_block, chunk)
            shape = (-1, n, chunk, values.shape[-1])
            grad_eq, grad_ek, grad_log_scale, grad_values = _causal_backward_block(
                features, values[block].view(shape), grad_out[block].view(shape), ctx.states[index],
                scores[block], feature_map.eps,
            )  # fmt: skip
            flat = (-1, length, grad_eq.shape[-1])
            grad_q[block] = feature_map.query_grad(
                grad_eq.view(flat), features.eq.view(flat), q[block], w
            )
            grad_k[block] = feature_map.key_grad(
                grad_ek.view(flat), features.ek.view(flat), k[block], w,
                None if grad_log_scale is None else grad_log_scale.view(-1, length, 1),
            )  # fmt: skip
            grad_v[block] = grad_values.view(-1, length, values.shape[-1])[..., :-1]
        return grad_q, grad_k, grad_v, None, None, None, None


def _causal_forward_block(
    f: _ChunkedFeatures, values: Tensor, eps: float, scores: Tensor, out: Tensor
) -> Tensor:
    """Forward of :class:`CausalFavor` for one block, writing into its outputs.

    values (R, n, C, d+1). Returns ``states`` (R, n, m, d+1): the state entering each chunk,
    S_c = sum_{j before chunk c} Ê_j^T exp(g_j - M_prev) V~_j; ``scores`` (R, n, C, C):
    X = E_q Ê_k^T + eps rowsum(Ê_k) (before the decay); ``out`` (R, n, C, d+1): numerator and
    normaliser.
    """
    num_features = f.eq.shape[-1]
    scaled_values = values if f.key_scale is None else values * f.key_scale
    increments = _bmm(f.ek.transpose(-2, -1), scaled_values)  # (R, n, m, d+1)
    states = _scan_states(increments, f.chunk_max, f.previous_max)
    valid_values = values if f.valid is None else values * f.valid
    past_values = _exclusive_sum(valid_values.sum(dim=-2, keepdim=True))  # (R, n, 1, d+1)
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
    return states


def _causal_backward_block(
    f: _ChunkedFeatures,
    values: Tensor,
    grad_out: Tensor,
    states: Tensor,
    scores: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Backward of :class:`CausalFavor` for one block.

    values, grad_out (R, n, C, d+1); states (R, n, m, d+1); scores (R, n, C, C) as the forward
    wrote them. Returns dE_q, dÊ_k (R, n, C, m), dg (R, n, C) or None, and dV~ (R, n, C, d+1).
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
    grad_query_total.add_((grad_out * past_values).sum(dim=-1, keepdim=True), alpha=eps)
    to_past_values = (grad_out * query_total).sum(dim=-2, keepdim=True).mul_(eps)  # (R, n, 1, d+1)
    # Later chunks, for the keys: the gradient of the state after each chunk.
    later = _scan_states(to_states, f.chunk_max, f.previous_max, reverse=True)
    through_keys = _bmm(f.ek, later)  # (R, n, C, d+1)
    if f.key_scale is not None:
        grad_log_scale.add_((through_keys * values).sum(dim=-1).mul_(f.key_scale.squeeze(-1)))
        through_keys.mul_(f.key_scale)
        scaled_values = values * f.key_scale
    else:
        scaled_values = values
    grad_values.add_(through_keys)
    _bmm_add_(grad_ek, scaled_values, later.transpose(-2, -1))
    later_values = _exclusive_sum(to_past_values, reverse=True)
    grad_values.add_(later_values if f.valid is None else later_values * f.valid)
    grad_eq.add_(grad_query_total)
    return grad_eq, grad_ek, grad_log_scale, grad_values
