"""FAVOR+ attention ops: fused bidirectional and causal kernels with hand-written backward
passes, the one-token causal recurrence, feature maps and random projections.

:class:`protperf.attention.FastAttention` is the nn.Module over these; the ops take rows already
flattened over batch and heads and cast to float32 (or float64).

Why fused kernels: autograd through the plain formulation keeps every L x m intermediate
(projections, exponentials, stabilisers, features with the stabiliser added) and allocates a fresh
one per operation, which on a CPU costs more in page faults and memory traffic than in arithmetic.
Here the feature exponentials are computed in place; the stabiliser eps, the key norms, the
normaliser and the key scales are folded into small L x (d+1) or m x (d+1) products; and rows go
in blocks whose features the backward recomputes instead of storing them
(:mod:`protperf.favor.blocks`).

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
* Bidirectional (:mod:`~protperf.favor.bidirectional`): M is the max of g over the row's valid
  keys (as the official code).
* Causal (:mod:`~protperf.favor.causal`): query i uses M_i = max of g over the keys j <= i, so
  that its output depends on the past alone, in value as well as in gradient, and equals the
  token-by-token recurrence (:func:`causal_step`), which can only know the past. Every scale
  exp(g_j - M_i) is <= 1.
ReLU (generalized): E = ReLU(xW), or ReLU(x) without a projection; no scales; eps = 1e-3.

Entry points:
    BidirectionalFavor.apply(q, k, v, w, valid, feature_map) -> (N, L, d)
    CausalFavor.apply(q, k, v, w, valid, feature_map, chunk) -> (N, L, d), L a multiple of chunk
    causal_step(q, k, v, w, feature_map, state) -> (out, DecodeState), q, k, v (B, H, 1, d)
with w (d, m) or None and valid (N, L, 1) bool or None (True at real keys). The naive quadratic
forms they are tested against are in :mod:`protperf.favor.reference` (not imported here).
"""

from protperf.favor.bidirectional import BidirectionalFavor
from protperf.favor.blocks import BLOCK_BYTES, KEEP_FEATURES_BYTES
from protperf.favor.causal import CausalFavor, DecodeState, causal_step
from protperf.favor.features import (
    DEFAULT_EXP_FLOOR,
    EXP_FLOOR,
    FEATURE_MAPS,
    FeatureMap,
    ReluFeatures,
    SoftmaxFeatures,
    flush_exp_,
    gaussian_iid_projection,
    gaussian_orthogonal_projection,
)

__all__ = [
    "BLOCK_BYTES",
    "DEFAULT_EXP_FLOOR",
    "EXP_FLOOR",
    "FEATURE_MAPS",
    "KEEP_FEATURES_BYTES",
    "BidirectionalFavor",
    "CausalFavor",
    "DecodeState",
    "FeatureMap",
    "ReluFeatures",
    "SoftmaxFeatures",
    "causal_step",
    "flush_exp_",
    "gaussian_iid_projection",
    "gaussian_orthogonal_projection",
]
