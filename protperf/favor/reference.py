"""Naive O(L^2) forms of FAVOR+ that the fused kernels are tested against.

Nothing here is used by the model: these are the plain formulas, differentiated by autograd,
written for clarity and float64 exactness rather than speed or memory. Shapes: q, k, v are
(B, H, L, d); features (B, H, L, m); ``projection`` is the module's W (m, d), unscaled (None: no
projection); ``key_padding_mask`` (B, L) bool, True at padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protperf.favor.features import ReluFeatures, SoftmaxFeatures


def softmax_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool | None = None,
    key_padding_mask: Tensor | None = None,
    eps: float = SoftmaxFeatures.default_eps,
) -> Tensor:
    """Positive random features of the softmax kernel. x: (..., L, d) -> (..., L, m).

    With ``is_query=None`` this is the plain estimator m^-1/2 exp(W x' - |x'|^2/2), x' = d^-1/4 x,
    whose dot products are unbiased for exp(q.k/sqrt(d)). Inside attention the features are
    stabilised as in the official code, by factors that cancel between numerator and normaliser:

    * queries (``is_query=True``): exp(W x' - max_j (W x')_j) + eps – the per-position factors
      exp(-|x'|^2/2) and exp(-max) cancel in the row normalisation;
    * keys (``is_query=False``): exp(W x' - |x'|^2/2 - M) + eps with one M per (batch, head), the
      max over the non-padded positions; padded keys get zero features.
    """
    dim = x.shape[-1]
    scaled = x * dim**-0.25
    logits = scaled @ projection.T.to(scaled.dtype)
    ratio = projection.shape[0] ** -0.5
    if is_query is None:
        half_norm = scaled.pow(2).sum(-1, keepdim=True) / 2
        return ratio * torch.exp(logits - half_norm)
    if is_query:
        features = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach()) + eps
        return ratio * features
    logits = logits - scaled.pow(2).sum(-1, keepdim=True) / 2
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        key_max = logits.detach().masked_fill(pad, -torch.inf).amax(dim=(-2, -1), keepdim=True)
        features = (torch.exp(logits - key_max) + eps).masked_fill(pad, 0.0)
    else:
        key_max = logits.detach().amax(dim=(-2, -1), keepdim=True)
        features = torch.exp(logits - key_max) + eps
    return ratio * features


def relu_kernel_features(
    x: Tensor,
    projection: Tensor | None,
    *,
    key_padding_mask: Tensor | None = None,
    eps: float = ReluFeatures.default_eps,
) -> Tensor:
    """Generalized-kernel features ReLU(W x) + eps (W = I when ``projection`` is None).

    x: (..., L, d) -> (..., L, m) (m = d without a projection); padded keys get zero features.
    """
    logits = x if projection is None else x @ projection.T.to(x.dtype)
    features = F.relu(logits) + eps
    if key_padding_mask is not None:
        features = features.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return features


def naive_favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor | None,
    *,
    kernel: str,
    causal: bool,
    eps: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Quadratic FAVOR+: features by the plain feature maps, A = Q'K'^T (masked), row-normalised.

    q, k, v (B, H, L, d) -> (B, H, L, d), zero at padded positions. ``kernel`` is "softmax" or
    "relu"; ``eps`` the stabiliser. Causal softmax: see :func:`naive_causal_softmax_favor`.
    """
    if kernel == "softmax" and causal:
        return naive_causal_softmax_favor(q, k, v, projection, eps, key_padding_mask)
    if kernel == "softmax":
        qf = softmax_kernel_features(q, projection, is_query=True)
        kf = softmax_kernel_features(
            k, projection, is_query=False, key_padding_mask=key_padding_mask
        )
    else:
        qf = relu_kernel_features(q, projection)
        kf = relu_kernel_features(k, projection, key_padding_mask=key_padding_mask)
    scores = qf @ kf.transpose(-2, -1)
    if causal:
        scores = scores.tril()
    return normalise_rows(scores, v, key_padding_mask)


def naive_causal_softmax_favor(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    eps: float,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """Causal softmax FAVOR+, (B, H, L, d) -> (B, H, L, d): query i sees key j through
    exp(W k'_j - |k'_j|^2/2 - M_i) + eps, M_i the max over keys up to i (so that nothing after i
    enters position i, not even a stabiliser). Forms a (B, H, L, L, m) tensor: small inputs only.
    """
    dim, length = q.shape[-1], q.shape[-2]
    q_logits = (q * dim**-0.25) @ projection.T
    query_features = torch.exp(q_logits - q_logits.amax(-1, keepdim=True).detach()) + eps
    k_scaled = k * dim**-0.25
    k_logits = k_scaled @ projection.T - k_scaled.pow(2).sum(-1, keepdim=True) / 2  # (B, H, L, m)
    valid = torch.ones(q.shape[0], length, dtype=torch.bool)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid = valid[:, None, :, None]
    key_max = k_logits.detach().amax(-1, keepdim=True).masked_fill(~valid, -torch.inf)
    running_max = torch.cummax(key_max.squeeze(-1), dim=-1).values  # (B, H, L)
    # (B, H, L_i, L_j, m): key j's features as query i sees them.
    key_features = torch.exp(k_logits.unsqueeze(2) - running_max[..., :, None, None]) + eps
    key_features = key_features * valid.unsqueeze(2)
    scores = torch.einsum("bhim,bhijm->bhij", query_features, key_features).tril()
    return normalise_rows(scores, v, key_padding_mask)


def normalise_rows(scores: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """scores (B, H, L, L), v (B, H, L, d) -> (scores v) / rowsum(scores), zero at padding."""
    out = (scores @ v) / scores.sum(-1, keepdim=True)
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return out


def random_qkv(
    batch: int,
    heads: int,
    length: int,
    dim: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    scale: float = 0.7,
) -> list[Tensor]:
    """Seeded q, k, v (batch, heads, length, dim), N(0, scale^2), requiring grad: the inputs the
    kernels and the references are compared on."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) * scale
        ).requires_grad_()
        for _ in range(3)
    ]
