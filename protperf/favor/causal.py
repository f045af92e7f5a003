"""Causal FAVOR+: the chunked kernel (training, whole sequences) and the one-token recurrence
(decoding), side by side, computing the same out_i.

Notation (per row; N = batch * heads, see :mod:`protperf.favor`): q, k, v (N, L, d); W (d, m);
E_q, Ê_k (N, L, m) the features without the stabiliser and g (N, L, 1) the key log-scales (from
:mod:`protperf.favor.features`); V~ = [v, 1] (N, L, d+1);
    out_i = sum_{j<=i} (Q''_i . K''_j) V~_j,   Q''_i = E_q,i + eps,
    K''_j = Ê_k,j exp(g_j - M_i) + eps * valid_j,   result_i = out_i[:d] / out_i[d].
Query i uses M_i = the max of g over the keys j <= i, so that its output depends on the past
alone, in value as well as in gradient: the recurrence, which can only know the past, then gives
the chunked kernel's result. Every scale exp(g_j - M_i) is <= 1. Without key scales (ReLU)
M plays no part.

* :func:`causal_step`: one position at a time from a :class:`DecodeState` of size m x (d+1) per
  row, O(m d) per token whatever the position.
* :class:`CausalFavor`: chunks of C positions. Within a chunk the masked C x C scores are formed;
  across chunks a carried state (m x (d+1) per chunk) holds the past, found for all chunks at
  once by a grouped scan (:func:`_scan_states`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from protperf.favor.blocks import (
    _normalise,
    _output_gradient,
    _row_blocks,
    _segments,
    _values_with_ones,
)
from protperf.favor.features import FeatureMap, flush_exp_

# ---------------------------------------------------------------------------------------------
# The recurrence: one token
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodeState:
    """What one causal attention layer remembers while decoding token by token.

    FAVOR+ (constant size, whatever the length):
        context (B, H, m, d+1): sum over past keys of E_k^T [v, 1], at the scale exp(-key_max);
        value_sum (B, H, 1, d+1): sum over past keys of [v, 1] (the stabiliser's share);
        key_max (B, H, 1, 1): the running max of the key logits (softmax kernel only).
    Exact attention (grows with the length): context holds the keys (B, H, t, d), value_sum the
    values (B, H, t, d).
    """

    context: Tensor
    value_sum: Tensor
    key_max: Tensor | None = None


def causal_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor | None,
    feature_map: FeatureMap,
    state: DecodeState | None = None,
) -> tuple[Tensor, DecodeState]:
    """One position of causal FAVOR+: q, k, v (B, H, 1, d) -> (B, H, 1, d) and the new state.

    ``w`` (d, m) or None, as :class:`CausalFavor` takes it; ``state`` None at the first position.
    The result equals :class:`CausalFavor`'s at that position, up to rounding: the context is kept
    at the scale of the running max of the key log-scales (M_i above), rescaled when a new key
    raises it. Computes in the inputs' dtype; no autograd graph is meant to be kept.
    """
    values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, 1, d+1)
    query_features = feature_map.queries(q, w)
    key_features, key_max = feature_map.keys(k, w, None)
    if key_max is not None:  # softmax: scale the new key, and the past, to the running max
        log_scale = key_max
        if state is not None:
            key_max = torch.maximum(log_scale, state.key_max)
        key_features = key_features * flush_exp_(log_scale - key_max)
    context = key_features.transpose(-2, -1) @ values  # (B, H, m, d+1)
    value_sum = values
    if state is not None:
        previous = state.context
        if key_max is not None:
            previous = previous * flush_exp_(state.key_max - key_max)
        context, value_sum = context + previous, values + state.value_sum
    eps = feature_map.eps
    out = (query_features + eps) @ (context + eps * value_sum)
    out = out[..., :-1] / out[..., -1:]
    return out, DecodeState(context, value_sum, key_max)


# ---------------------------------------------------------------------------------------------
# The chunked kernel: whole sequences
# ---------------------------------------------------------------------------------------------


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
