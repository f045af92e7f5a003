"""Fused FAVOR+ attention kernels (bidirectional and causal) with hand-written backward passes.

Why this exists: autograd through the plain formulation keeps every L x m intermediate
(projections, exponentials, stabilisers, features with the stabiliser added) and allocates a fresh
one per operation, which on a CPU costs more in page faults and memory traffic than in arithmetic.
Here the feature exponentials are computed in place, the stabiliser eps, the key norms and the
normaliser are folded into small L x (d+1) or m x (d+1) products, and the causal kernel works one
batch-and-head row at a time, recomputing that row's features in the backward instead of storing
them.

Notation (per batch-and-head row; the leading dimension N = batch * heads):
    q, k, v   (N, L, d)     inputs;   W (d, m): the projection (already scaled by d^-1/4 for softmax)
    E_q, E_k  (N, L, m)     features without the stabiliser (zero at padded keys)
    Q'' = E_q + eps,  K'' = E_k + eps * valid      the features of the official code
    V~ = [v, 1]  (N, L, d+1)                       the last output column is the normaliser
    out_i = sum_j A_ij V~_j,  A = Q'' K''^T (lower triangle when causal),  result = out / out[:, d]

Softmax features: E_q = exp(qW - max_j (qW)_j) and E_k = exp(kW - |k|^2/(2 sqrt d) - M), M the max
over the row's valid keys. The per-query max and M cancel between numerator and normaliser and are
constants in the backward, as the official code's stop_gradient makes them.
ReLU (generalized) features: E = ReLU(xW), or ReLU(x) without a projection; eps = 1e-3.
"""

from __future__ import annotations

import itertools
import math

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

    def keys(self, k: Tensor, w: Tensor | None, valid: Tensor | None) -> Tensor:
        """(N, L, d) -> E_k (N, L, m), zero where ``valid`` (N, L, 1) is False."""
        raise NotImplementedError

    def query_grad(self, grad: Tensor, features: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
        """dE_q (N, L, m, overwritten) -> dq (N, L, d)."""
        raise NotImplementedError

    def key_grad(self, grad: Tensor, features: Tensor, k: Tensor, w: Tensor | None) -> Tensor:
        """dE_k (N, L, m, overwritten) -> dk (N, L, d)."""
        raise NotImplementedError


class SoftmaxFeatures(FeatureMap):
    """FAVOR+ positive random features of exp(q.k / sqrt(d)); ``w`` is W^T d^-1/4, (d, m)."""

    default_eps = 1e-6

    def queries(self, q: Tensor, w: Tensor | None) -> Tensor:
        logits = torch.matmul(q, w)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        return logits.exp_()

    def keys(self, k: Tensor, w: Tensor | None, valid: Tensor | None) -> Tensor:
        logits = torch.matmul(k, w)
        half_sq_norm = k.pow(2).sum(dim=-1, keepdim=True) * (0.5 / math.sqrt(k.shape[-1]))
        row_max = logits.amax(dim=-1, keepdim=True) - half_sq_norm
        if valid is not None:
            row_max.masked_fill_(~valid, -math.inf)
        offset = half_sq_norm + row_max.amax(dim=-2, keepdim=True)
        if valid is not None:
            offset.masked_fill_(~valid, math.inf)
        return logits.sub_(offset).exp_()

    def query_grad(self, grad: Tensor, features: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
        return torch.matmul(grad.mul_(features), w.T)

    def key_grad(self, grad: Tensor, features: Tensor, k: Tensor, w: Tensor | None) -> Tensor:
        # Through k W and through -|k|^2 / (2 sqrt d): one matmul gives both (last column = row sum).
        w_and_ones = torch.cat([w.T, w.new_ones(w.shape[1], 1)], dim=1)  # (m, d+1)
        g = torch.matmul(grad.mul_(features), w_and_ones)
        return g[..., :-1] - g[..., -1:] * k * (1.0 / math.sqrt(k.shape[-1]))


class ReluFeatures(FeatureMap):
    """The generalized kernel's features ReLU(x W), or ReLU(x) when ``w`` is None."""

    default_eps = 1e-3

    def queries(self, q: Tensor, w: Tensor | None) -> Tensor:
        return torch.matmul(q, w).relu_() if w is not None else q.clamp(min=0)

    def keys(self, k: Tensor, w: Tensor | None, valid: Tensor | None) -> Tensor:
        features = self.queries(k, w)
        return features if valid is None else features.masked_fill_(~valid, 0.0)

    def query_grad(self, grad: Tensor, features: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
        grad = grad.masked_fill_(features <= 0, 0.0)
        return torch.matmul(grad, w.T) if w is not None else grad

    key_grad = query_grad


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


class BidirectionalFavor(torch.autograd.Function):
    """out = D^-1 Q''(K''^T V~): q, k, v (N, L, d) -> (N, L, d).

    ``apply(q, k, v, w, valid, feature_map)``: w (d, m) or None, valid (N, L, 1) bool or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, valid, feature_map: FeatureMap):
        eps = feature_map.eps
        eq, ek = feature_map.queries(q, w), feature_map.keys(k, w, valid)
        values = _values_with_ones(v)
        valid_values = values if valid is None else values * valid
        # C = K''^T V~ = E_k^T V~ + eps * sum_l valid_l V~_l    (N, m, d+1)
        context = torch.matmul(ek.transpose(-2, -1), values)
        context.add_(valid_values.sum(dim=-2, keepdim=True), alpha=eps)
        # out = Q'' C = E_q C + eps * sum_j C_j
        out = torch.matmul(eq, context)
        out.add_(context.sum(dim=-2, keepdim=True), alpha=eps)
        normalised, denominator = _normalise(out)
        ctx.save_for_backward(q, k, w, eq, ek, values, context, normalised, denominator, valid)
        ctx.feature_map = feature_map
        return normalised

    @staticmethod
    def backward(ctx, grad):
        q, k, w, eq, ek, values, context, normalised, denominator, valid = ctx.saved_tensors
        feature_map = ctx.feature_map
        eps = feature_map.eps
        grad_out = _output_gradient(grad, normalised, denominator)  # (N, L, d+1)
        # dC = Q''^T dOut
        grad_context = torch.matmul(eq.transpose(-2, -1), grad_out)
        grad_context.add_(grad_out.sum(dim=-2, keepdim=True), alpha=eps)
        # dE_q = dOut C^T;  dE_k = V~ dC^T (zero at padding after the feature map's backward)
        grad_q = feature_map.query_grad(torch.matmul(grad_out, context.transpose(-2, -1)), eq, q, w)
        grad_k = feature_map.key_grad(
            torch.matmul(values, grad_context.transpose(-2, -1)), ek, k, w
        )
        # dV~ = K'' dC
        grad_values = torch.matmul(ek, grad_context)
        eps_term = grad_context.sum(dim=-2, keepdim=True) * eps
        grad_values.add_(eps_term if valid is None else eps_term * valid)
        return grad_q, grad_k, grad_values[..., :-1], None, None, None


def _exclusive_prefix(x: Tensor, out: Tensor | None = None, reverse: bool = False) -> Tensor:
    """The sum of the chunks strictly before (after, with ``reverse``) each chunk.

    x: (n, m, f) -> (n, m, f), written into ``out`` when given. A loop of n small adds: cheaper
    on a CPU than cumsum plus a shift (strided, allocating), and summed in a fixed order.
    """
    out = torch.empty_like(x) if out is None else out
    order = list(range(x.shape[0]))
    if reverse:
        order.reverse()
    out[order[0]].zero_()
    for previous, index in itertools.pairwise(order):
        torch.add(out[previous], x[previous], out=out[index])
    return out


class CausalFavor(torch.autograd.Function):
    """out_i = sum_{j<=i} (Q''_i . K''_j) V~_j, normalised, in chunks of C: (N, L, d) -> (N, L, d).

    ``apply(q, k, v, w, valid, feature_map, chunk)``; L must be a multiple of ``chunk`` (the
    caller pads, marking the extra keys invalid). Within a chunk the masked C x C scores are
    formed; across chunks an exclusive prefix of the chunk states K''_c^T V~_c carries the past.
    Kept for the backward: the L/C states (m x (d+1) each) and the L x C scores; the L x m
    features exist for one row at a time. No L x m x d tensor is ever formed.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, valid, feature_map: FeatureMap, chunk: int):
        rows, length = q.shape[:2]
        n = length // chunk
        values = _values_with_ones(v)
        num_features = w.shape[1] if w is not None else q.shape[-1]
        past = values.new_empty(rows, n, num_features, values.shape[-1])
        scores = values.new_empty(rows, n, chunk, chunk)
        out = torch.empty_like(values)
        for row in range(rows):
            eq, ek, valid_c = _row_features(feature_map, q, k, w, valid, row, chunk)
            values_c = values[row].view(n, chunk, -1)
            _causal_forward_row(
                eq,
                ek,
                values_c,
                valid_c,
                feature_map.eps,
                past[row],
                scores[row],
                out[row].view_as(values_c),
            )
        normalised, denominator = _normalise(out)
        ctx.save_for_backward(q, k, w, values, past, scores, normalised, denominator, valid)
        ctx.feature_map, ctx.chunk = feature_map, chunk
        return normalised

    @staticmethod
    def backward(ctx, grad):
        q, k, w, values, past, scores, normalised, denominator, valid = ctx.saved_tensors
        feature_map, chunk = ctx.feature_map, ctx.chunk
        rows, length = k.shape[:2]
        n = length // chunk
        grad_out = _output_gradient(grad, normalised, denominator)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(grad)
        for row in range(rows):
            eq, ek, valid_c = _row_features(feature_map, q, k, w, valid, row, chunk)
            grad_eq, grad_ek, grad_values = _causal_backward_row(
                eq, ek, values[row].view(n, chunk, -1), grad_out[row].view(n, chunk, -1),
                past[row], scores[row], valid_c, feature_map.eps,
            )  # fmt: skip
            grad_q[row] = feature_map.query_grad(
                grad_eq.view(length, -1), eq.view(length, -1), q[row], w
            )
            grad_k[row] = feature_map.key_grad(
                grad_ek.view(length, -1), ek.view(length, -1), k[row], w
            )
            grad_v[row] = grad_values.view(length, -1)[:, :-1]
        return grad_q, grad_k, grad_v, None, None, None, None


def _row_features(
    feature_map: FeatureMap,
    q: Tensor,
    k: Tensor,
    w: Tensor | None,
    valid: Tensor | None,
    row: int,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """E_q, E_k (n, C, m) and the float validity (n, C, 1) of one batch-and-head row, in chunks."""
    n = q.shape[1] // chunk
    valid_row = None if valid is None else valid[row : row + 1]
    eq = feature_map.queries(q[row], w)
    ek = feature_map.keys(k[row : row + 1], w, valid_row)[0]
    valid_c = None if valid is None else valid[row].view(n, chunk, 1).to(q.dtype)
    return eq.view(n, chunk, -1), ek.view(n, chunk, -1), valid_c


def _causal_forward_row(
    eq: Tensor,
    ek: Tensor,
    values: Tensor,
    valid: Tensor | None,
    eps: float,
    past: Tensor,
    scores: Tensor,
    out: Tensor,
) -> None:
    """Forward of :class:`CausalFavor` for one row, in chunks, writing into its outputs.

    eq, ek (n, C, m); values (n, C, d+1); valid (n, C, 1) or None. Writes ``past`` (n, m, d+1):
    the exclusive prefix of the chunk states K''_c^T V~_c; ``scores`` (n, C, C): the lower
    triangle of Q''_c K''_c^T; ``out`` (n, C, d+1): the numerator and the normaliser.
    """
    num_features = eq.shape[-1]
    states = torch.bmm(ek.transpose(-2, -1), values)
    valid_values = values if valid is None else values * valid
    states.add_(valid_values.sum(dim=-2, keepdim=True), alpha=eps)
    _exclusive_prefix(states, out=past)
    # Q''_c K''_c^T = E_q E_k^T + eps (rowsum(E_q) valid^T + 1 rowsum(E_k)^T + m eps 1 valid^T)
    torch.bmm(eq, ek.transpose(-2, -1), out=scores)
    sum_eq = eq.sum(dim=-1, keepdim=True)  # (n, C, 1)
    sum_ek = ek.sum(dim=-1).unsqueeze(-2)  # (n, 1, C)
    if valid is None:
        scores.add_(sum_eq + sum_ek + num_features * eps, alpha=eps)
    else:
        scores.add_((sum_eq + num_features * eps) * valid.transpose(-2, -1) + sum_ek, alpha=eps)
    scores.tril_()
    torch.bmm(eq, past, out=out)
    out.add_(past.sum(dim=-2, keepdim=True), alpha=eps)
    out.baddbmm_(scores, values)


def _causal_backward_row(
    eq: Tensor,
    ek: Tensor,
    values: Tensor,
    grad_out: Tensor,
    past: Tensor,
    scores: Tensor,
    valid: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :class:`CausalFavor` for one row, in chunks.

    eq, ek (n, C, m); values, grad_out (n, C, d+1); past (n, m, d+1); scores (n, C, C).
    Returns dE_q, dE_k (n, C, m) and dV~ (n, C, d+1).
    """
    # B_c = dOut_c V~_c^T, lower triangle: couples each query to the keys of its own chunk.
    b = torch.bmm(grad_out, values.transpose(-2, -1)).tril_()  # (n, C, C)
    # dQ'' = dOut_c S_c^T + B_c K''_c = dOut_c S_c^T + B_c E_k + eps (B_c valid) 1^T
    b_valid = b.sum(dim=-1, keepdim=True) if valid is None else torch.bmm(b, valid)
    grad_eq = torch.bmm(grad_out, past.transpose(-2, -1))
    grad_eq.baddbmm_(b, ek).add_(b_valid.mul_(eps))
    # R_c = sum over later chunks of Q''^T dOut: (n, m, d+1)
    later = torch.bmm(eq.transpose(-2, -1), grad_out)
    later.add_(grad_out.sum(dim=-2, keepdim=True), alpha=eps)
    later = _exclusive_prefix(later, reverse=True)
    # dK'' = V~_c R_c^T + B_c^T Q''_c = V~_c R_c^T + B_c^T E_q + eps (B_c^T 1) 1^T
    b_cols = b.sum(dim=-2).unsqueeze(-1).mul_(eps)  # (n, C, 1)
    grad_ek = torch.bmm(values, later.transpose(-2, -1))
    grad_ek.baddbmm_(b.transpose(-2, -1), eq).add_(b_cols)
    # dV~ = K''_c R_c + A_c^T dOut_c
    grad_values = torch.bmm(ek, later)
    eps_term = later.sum(dim=-2, keepdim=True) * eps
    grad_values.add_(eps_term if valid is None else eps_term * valid)
    grad_values.baddbmm_(scores.transpose(-2, -1), grad_out)
    return grad_eq, grad_ek, grad_values
