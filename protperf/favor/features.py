"""Feature maps of FAVOR+ and the random projections they use.

A feature map turns queries and keys (N, L, d) into non-negative features (N, L, m) and carries
gradients back through them; the kernels in :mod:`protperf.favor.bidirectional` and
:mod:`protperf.favor.causal` only ever see features. N = batch * heads rows; W (d, m) is the
projection as the kernels multiply by it (for softmax, already scaled by d^-1/4).

* Softmax: E_q = exp(qW - max_j (qW)_j), Ê_k = exp(kW - max_j (kW)_j) and the key log-scales
  g = max_j (kW)_j - |k|^2/(2 sqrt d), so that Ê_k exp(g) = exp(kW - |k|^2/(2 sqrt d)), the FAVOR+
  positive feature up to m^-1/2; eps = 1e-6.
* ReLU (generalized): E = ReLU(xW), or ReLU(x) without a projection; no scales; eps = 1e-3.

The projections are drawn as (m, d) float32 matrices on the CPU, from a seeded generator, so that
every process draws the same features.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

#: Exponents below the floor give exactly 0 instead of a subnormal float. x86 CPUs compute on
#: subnormals several times slower, and a trained softmax model's features span enough orders of
#: magnitude to produce them. The protperf command also turns on the CPU's flush-to-zero
#: (protperf.runtime.flush_denormals); this floor keeps the kernels fast without it, in any
#: program that imports them. e^-25 is 1e-5 of the eps that every feature carries, so dropping
#: smaller values changes no output measurably. float64 keeps values to e^-200 (the exactness
#: tests compare with a naive reference to 1e-10).
EXP_FLOOR = {torch.float64: -200.0}
DEFAULT_EXP_FLOOR = -25.0


def flush_exp_(x: Tensor) -> Tensor:
    """exp in place, entries at or below the dtype's floor set to exactly 0 (never subnormal).

    x: any shape. Callers pass fresh temporaries (differences of maxima, logits), so no copy is
    made. Three streaming passes, none of which meets a subnormal or builds a boolean mask: clamp
    the exponents a little below the floor (so that exp stays a normal float), exp, then zero what
    is at most exp(floor); NaN stays NaN."""
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
        # and masked_fill_ would cost an extra L x m allocation and two more passes.
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
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device="cpu")
        # numpy's QR: torch's spends milliseconds in thread start-up for a d x d matrix.
        q, r = (torch.from_numpy(x) for x in np.linalg.qr(gaussian.numpy()))
        # Sign-fix so that Q is Haar-distributed (QR alone leaves a sign bias).
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T)
    projection = torch.cat(blocks, dim=0)[:num_features]
    if scaling == "chi":
        norms = torch.randn(
            num_features, dim, generator=generator, dtype=torch.float64, device="cpu"
        ).norm(dim=1)
    elif scaling == "sqrt_d":
        norms = torch.full((num_features,), math.sqrt(dim), dtype=torch.float64, device="cpu")
    else:
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
    return (projection * norms.unsqueeze(1)).float()


def gaussian_iid_projection(num_features: int, dim: int, *, generator: torch.Generator) -> Tensor:
    """I.i.d. N(0, I_d) random features W: (num_features, dim), float32, on the CPU."""
    return torch.randn(
        num_features, dim, generator=generator, dtype=torch.float64, device="cpu"
    ).float()
