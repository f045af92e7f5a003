"""FAVOR+ attention: positive orthogonal random features, bidirectional and causal, in O(L).

Shapes: ``q, k, v`` are ``(batch, heads, length, head_dim)``; features are
``(batch, heads, length, num_features)``; ``key_padding_mask`` is ``(batch, length)`` bool with
True at padding positions (the convention of ``torch.nn.MultiheadAttention``).

Kernels (one interface, :class:`FastAttention`):

* ``"softmax"`` – FAVOR+: phi(x) = m^-1/2 exp(W x - |x|^2/2) on x = d^-1/4 q (or k), so that
  E[phi(q).phi(k)] = exp(q.k / sqrt(d)). Orthogonal W by default (block QR, chi(d) row norms).
* ``"relu"`` – the paper's generalized kernel: phi(x) = ReLU(W x) + 1e-3, with no projection by
  default (W = I, as the official code's "deterministic" features).
* ``"exact"`` – softmax attention via ``scaled_dot_product_attention``: the Transformer baseline.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kernel = Literal["softmax", "relu", "exact"]
FeatureType = Literal["orthogonal", "iid", "deterministic"]

SOFTMAX_STABILIZER = 1e-6
RELU_STABILIZER = 1e-3
DEFAULT_CHUNK_SIZE = 128


# ---------------------------------------------------------------------------------------------
# Random projections
# ---------------------------------------------------------------------------------------------


def gaussian_orthogonal_projection(
    num_features: int, dim: int, *, generator: torch.Generator, scaling: str = "chi"
) -> Tensor:
    """Orthogonal random features W: (num_features, dim), float32, on the CPU.

    ceil(m/d) blocks, each the Q factor of a QR of a d x d Gaussian, so rows within a block are
    exactly orthogonal. Rows are rescaled to the norms of independent N(0, I_d) vectors
    (``scaling="chi"``, the paper's "scaling 0": each row is then marginally N(0, I_d)) or to
    sqrt(d) (``scaling="sqrt_d"``).
    """
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Sign-fix so that Q is Haar-distributed (QR alone leaves a sign bias).
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T)
    projection = torch.cat(blocks, dim=0)[:num_features]
    if scaling == "chi":
        norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    elif scaling == "sqrt_d":
        norms = torch.full((num_features,), math.sqrt(dim), dtype=torch.float64)
    else:
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
    return (projection * norms.unsqueeze(1)).float()


def gaussian_iid_projection(num_features: int, dim: int, *, generator: torch.Generator) -> Tensor:
    """I.i.d. N(0, I_d) random features W: (num_features, dim), float32, on the CPU."""
    return torch.randn(num_features, dim, generator=generator, dtype=torch.float64).float()


# ---------------------------------------------------------------------------------------------
# Feature maps
# ---------------------------------------------------------------------------------------------


def softmax_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool | None = None,
    key_padding_mask: Tensor | None = None,
    eps: float = SOFTMAX_STABILIZER,
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
    eps: float = RELU_STABILIZER,
) -> Tensor:
    """Generalized-kernel features ReLU(W x) + eps (W = I when ``projection`` is None).

    x: (..., L, d) -> (..., L, m) (m = d without a projection); padded keys get zero features.
    """
    logits = x if projection is None else x @ projection.T.to(x.dtype)
    features = F.relu(logits) + eps
    if key_padding_mask is not None:
        features = features.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return features


# ---------------------------------------------------------------------------------------------
# Linear attention given features
# ---------------------------------------------------------------------------------------------


def _append_ones(v: Tensor) -> Tensor:
    """(…, L, d) -> (…, L, d+1): the extra column carries the normaliser through the same matmuls."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def linear_attention(query_features: Tensor, key_features: Tensor, v: Tensor) -> Tensor:
    """Bidirectional FAVOR+: D^-1 Q'(K'^T V). Features (B, H, L, m), v (B, H, L, d) -> (B, H, L, d)."""
    values = _append_ones(v)
    context = key_features.transpose(-2, -1) @ values  # (B, H, m, d+1)
    out = query_features @ context
    return out[..., :-1] / out[..., -1:]


def causal_linear_attention(
    query_features: Tensor, key_features: Tensor, v: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Causal FAVOR+ in chunks: out_i = sum_{j<=i} (q'_i.k'_j) v_j / sum_{j<=i} q'_i.k'_j.

    Features (B, H, L, m), v (B, H, L, d) -> (B, H, L, d). Within a chunk of C positions the
    masked C x C product is formed; across chunks a prefix sum of per-chunk K'^T V states
    (L/C states of m x (d+1)) carries the past, so no L x m x d tensor is ever formed.
    """
    batch, heads, length, num_features = query_features.shape
    chunk = min(chunk_size, length)
    padded = math.ceil(length / chunk) * chunk
    values = _append_ones(v)
    if padded != length:
        extra = (0, 0, 0, padded - length)
        query_features = F.pad(query_features, extra)
        key_features = F.pad(key_features, extra)
        values = F.pad(values, extra)
    n = padded // chunk
    qc = query_features.reshape(batch, heads, n, chunk, num_features)
    kc = key_features.reshape(batch, heads, n, chunk, num_features)
    vc = values.reshape(batch, heads, n, chunk, values.shape[-1])
    chunk_states = kc.transpose(-2, -1) @ vc  # (B, H, n, m, d+1)
    past = torch.cumsum(chunk_states, dim=2)
    past = torch.cat([torch.zeros_like(past[:, :, :1]), past[:, :, :-1]], dim=2)
    scores = (qc @ kc.transpose(-2, -1)).tril()  # (B, H, n, C, C)
    out = qc @ past + scores @ vc
    out = out.reshape(batch, heads, padded, -1)[:, :, :length]
    return out[..., :-1] / out[..., -1:]


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class FastAttention(nn.Module):
    """Attention over (batch, heads, length, head_dim) tensors: FAVOR+ or exact, one interface.

    Args:
        head_dim: d, the size of each head's queries, keys and values.
        num_features: m, the number of random features (softmax kernel, or relu with a projection).
        kernel: ``"softmax"`` (FAVOR+), ``"relu"`` (generalized) or ``"exact"`` (SDPA baseline).
        causal: unidirectional (each position attends to itself and the past) when True.
        feature_type: ``"orthogonal"`` (default for softmax), ``"iid"``, or ``"deterministic"``
            (no projection; the default and the official code's choice for relu).
        chunk_size: block length of the causal computation.
        seed: seed of the initial features; :meth:`redraw` draws new ones.
    """

    def __init__(
        self,
        *,
        head_dim: int,
        num_features: int = 256,
        kernel: Kernel = "softmax",
        causal: bool = False,
        feature_type: FeatureType | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kernel not in ("softmax", "relu", "exact"):
            raise ValueError(f"kernel must be 'softmax', 'relu' or 'exact', got {kernel!r}")
        if feature_type is None:
            feature_type = "deterministic" if kernel == "relu" else "orthogonal"
        if feature_type not in ("orthogonal", "iid", "deterministic"):
            raise ValueError(f"unknown feature_type {feature_type!r}")
        if kernel == "softmax" and feature_type == "deterministic":
            raise ValueError("the softmax kernel needs random features ('orthogonal' or 'iid')")
        self.head_dim = head_dim
        self.num_features = num_features
        self.kernel = kernel
        self.causal = causal
        self.feature_type = feature_type
        self.chunk_size = chunk_size
        has_projection = kernel != "exact" and feature_type != "deterministic"
        shape = (num_features, head_dim) if has_projection else (0, head_dim)
        self.register_buffer("projection", torch.zeros(shape), persistent=True)
        if has_projection:
            self.redraw(seed)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_features}, kernel={self.kernel!r}, "
            f"causal={self.causal}, feature_type={self.feature_type!r}"
        )

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new random features from ``seed``: identical on every process given the same seed."""
        if self.projection.shape[0] == 0:
            return
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if self.feature_type == "orthogonal":
            new = gaussian_orthogonal_projection(self.num_features, self.head_dim, generator=generator)
        else:
            new = gaussian_iid_projection(self.num_features, self.head_dim, generator=generator)
        self.projection.copy_(new.to(self.projection.device))

    def features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(query features, key features), each (B, H, L, m), computed in float32."""
        q, k = q.float(), k.float()
        if self.kernel == "softmax":
            return (
                softmax_kernel_features(q, self.projection, is_query=True),
                softmax_kernel_features(
                    k, self.projection, is_query=False, key_padding_mask=key_padding_mask
                ),
            )
        projection = self.projection if self.projection.shape[0] else None
        return (
            relu_kernel_features(q, projection),
            relu_kernel_features(k, projection, key_padding_mask=key_padding_mask),
        )

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend. q, k, v: (B, H, L, d); key_padding_mask: (B, L), True = padding -> (B, H, L, d).

        Outputs at padded positions are zero.
        """
        if self.kernel == "exact":
            out = self._exact(q, k, v, key_padding_mask)
        else:
            with torch.autocast(device_type=q.device.type, enabled=False):
                query_features, key_features = self.features(q, k, key_padding_mask)
            dtype = v.dtype if not torch.is_autocast_enabled(q.device.type) else torch.get_autocast_dtype(q.device.type)
            query_features, key_features = query_features.to(dtype), key_features.to(dtype)
            v = v.to(dtype)
            if self.causal:
                out = causal_linear_attention(query_features, key_features, v, chunk_size=self.chunk_size)
            else:
                out = linear_attention(query_features, key_features, v)
        if key_padding_mask is not None:
            out = out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        return out

    def _exact(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
        if self.causal:
            length = q.shape[-2]
            causal_mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            # A padded query row keeps its diagonal so that no row is empty (its output is zeroed).
            keep = (keep & causal_mask) | torch.eye(length, dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
