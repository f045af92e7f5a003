"""Bidirectional FAVOR+: out = D^-1 Q''(K''^T V~) in O(L m d), with a hand-written backward.

Notation (per row; N = batch * heads, see :mod:`protperf.favor`): q, k, v (N, L, d); W (d, m);
E_q, Ê_k (N, L, m) the features without the stabiliser and g (N, L, 1) the key log-scales (from
:mod:`protperf.favor.features`); Q'' = E_q + eps, K'' = Ê_k exp(g - M) + eps * valid;
V~ = [v, 1] (N, L, d+1). Every query sees every valid key, through one context C = K''^T V~
(m, d+1) per row. M is the max of g over the row's valid keys (as the official code); it cancels
between numerator and normaliser and is a constant in the backward (the official code's
stop_gradient).
"""

from __future__ import annotations

import torch

from protperf.favor.blocks import (
    _normalise,
    _output_gradient,
    _row_blocks,
    _segments,
    _values_with_ones,
)
from protperf.favor.features import FeatureMap, flush_exp_


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
