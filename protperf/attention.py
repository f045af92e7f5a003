"""FastAttention: FAVOR+ (positive orthogonal random features, O(L)) and the paper's baselines.

Shapes: ``q, k, v`` are ``(batch, heads, length, head_dim)``; features are
``(batch, heads, length, num_features)``; ``key_padding_mask`` is ``(batch, length)`` bool with
True at padding positions (the convention of ``torch.nn.MultiheadAttention``).

Kernels (one interface, :class:`FastAttention`; the names are :data:`Kernel`, checked by
:func:`check_kernel`):

* ``"softmax"`` – FAVOR+: phi(x) = m^-1/2 exp(W x - |x|^2/2) on x = d^-1/4 q (or k), so that
  E[phi(q).phi(k)] = exp(q.k / sqrt(d)). Orthogonal W by default (block QR, chi(d) row norms).
* ``"relu"`` – the paper's generalized kernel: phi(x) = ReLU(W x) + 1e-3, with no projection by
  default (W = I, as the official code's "deterministic" features).
* ``"exact"`` – softmax attention via ``scaled_dot_product_attention``: the Transformer baseline.
* ``"reformer"`` – Reformer's LSH attention (:mod:`protperf.baselines.lsh`): queries double as
  keys (the model passes q as k), hashed by random rotations drawn from a seed, so that
  :meth:`FastAttention.redraw` renews them as it renews FAVOR+'s features.
* ``"linformer"`` – Linformer (:mod:`protperf.baselines.linformer`): learned (n x k) length
  projections of keys and values, n = ``max_length``; bidirectional only.

The FAVOR+ ops themselves (fused kernels, decoding recurrence, feature maps, projections) are in
:mod:`protperf.favor`; this module flattens batch and heads into rows, casts, pads and dispatches.

Backends of FAVOR+ (:data:`Backend`): ``"torch"``, the PyTorch kernels of :mod:`protperf.favor`
(the CPU path and the reference); ``"triton"``, the fused GPU kernels of
:mod:`protperf.favor.triton`; ``"auto"``, Triton on CUDA tensors when it is installed, PyTorch
elsewhere. Decoding (:meth:`FastAttention.step`) is the PyTorch recurrence on every backend: one
token costs O(m d), nothing to fuse.
"""

from __future__ import annotations

import sys
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protperf.baselines import draw_rotations, init_projection, linformer_attention, lsh_attention
from protperf.favor import (
    FEATURE_MAPS,
    BidirectionalFavor,
    CausalFavor,
    DecodeState,
    causal_step,
    gaussian_iid_projection,
    gaussian_orthogonal_projection,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BUCKET_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_HASHES",
    "DEFAULT_LINFORMER_K",
    "FAVOR_KERNELS",
    "KERNELS",
    "KERNEL_NAMES",
    "LINFORMER_NOT_CAUSAL",
    "NO_STEP",
    "Backend",
    "DecodeState",
    "FastAttention",
    "FeatureType",
    "Kernel",
    "check_backend",
    "check_kernel",
]

Kernel = Literal["softmax", "relu", "exact", "reformer", "linformer"]
KERNELS: tuple[Kernel, ...] = get_args(Kernel)
FeatureType = Literal["orthogonal", "iid", "deterministic"]
Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)

#: Rows of the paper's Table 2.
KERNEL_NAMES: dict[Kernel, str] = {
    "softmax": "Performer (softmax)",
    "relu": "Performer (generalized)",
    "exact": "Transformer",
    "reformer": "Reformer",
    "linformer": "Linformer",
}
#: Kernels whose attention is FAVOR+ (random or deterministic features, O(L)).
FAVOR_KERNELS: tuple[Kernel, ...] = ("softmax", "relu")

DEFAULT_CHUNK_SIZE = 64
#: Reformer's defaults: chunks of 64 (Kitaev et al. 2020) and 4 hash rounds (reformer-pytorch's
#: ReformerLM; the paper trains with 1 to 8, more being closer to exact attention and slower).
DEFAULT_BUCKET_SIZE = 64
DEFAULT_HASHES = 4
#: Linformer's projected length k (Wang et al. 2020 use 128 and 256).
DEFAULT_LINFORMER_K = 256


def check_kernel(kernel: str) -> Kernel:
    """``kernel`` itself if it names one of :data:`KERNELS`; ValueError otherwise."""
    if kernel not in KERNELS:
        names = ", ".join(repr(name) for name in KERNELS)
        raise ValueError(f"kernel must be one of {names}, got {kernel!r}")
    return kernel


def check_backend(backend: str) -> Backend:
    """``backend`` itself if it names one of :data:`BACKENDS`; ValueError otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend


LINFORMER_NOT_CAUSAL = (
    "the Linformer kernel has no causal form: its projections mix every position, the future "
    "included, into each projected key and value"
)
#: Why a kernel cannot decode a token at a time (generate).
NO_STEP = (
    "the {kernel} kernel cannot decode one token at a time: it re-sorts the whole sequence at "
    "every length; generate with a FAVOR+ or exact-attention model"
)


def _contiguous_as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, contiguous, in one copy at most (``to`` keeps a cast's strides, and
    ignores ``memory_format`` when there is nothing to cast)."""
    if x.dtype == dtype:
        return x.contiguous()
    return x.to(dtype, memory_format=torch.contiguous_format)


def _run_triton(q, k, v, w, key_padding_mask, causal, softmax, eps):
    from protperf.favor import triton as favor_triton

    with torch.autocast(device_type=q.device.type, enabled=False):
        run = favor_triton.causal_favor if causal else favor_triton.bidirectional_favor
        return run(q, k, v, w, key_padding_mask, softmax=softmax, eps=eps)


_UNCOMPILED: dict = {}


def _uncompiled(function):
    """``function`` kept out of torch.compile's graphs (the Triton kernels are launched eagerly,
    with their own tuning) once TorchDynamo is loaded; before that, as it is, so that importing
    protperf never loads TorchDynamo (over a second)."""
    if "torch._dynamo" not in sys.modules:
        return function
    if function not in _UNCOMPILED:
        _UNCOMPILED[function] = torch.compiler.disable(function)
    return _UNCOMPILED[function]


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
        stabilizer: added to every feature (default 1e-6 for softmax, 1e-3 for relu, as the
            official code); 0 makes the output exactly invariant to the max-subtraction.
        backend: FAVOR+'s kernels: ``"auto"`` (Triton on CUDA tensors when Triton is
            installed, else PyTorch), ``"torch"`` or ``"triton"`` (CUDA tensors, or CPU ones under
            TRITON_INTERPRET=1). The Triton kernels choose their own chunk of positions.
        bucket_size: Reformer: the chunk length, and L / bucket_size buckets.
        n_hashes: Reformer: rounds of hashing.
        max_length: Linformer: n, the longest sequence its projections read.
        linformer_k: Linformer: k, the projected length of keys and values.
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
        stabilizer: float | None = None,
        backend: Backend = "auto",
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        n_hashes: int = DEFAULT_HASHES,
        max_length: int | None = None,
        linformer_k: int = DEFAULT_LINFORMER_K,
    ) -> None:
        super().__init__()
        check_kernel(kernel)
        check_backend(backend)
        if kernel == "linformer" and causal:
            raise ValueError(LINFORMER_NOT_CAUSAL)
        if kernel == "linformer" and max_length is None:
            raise ValueError("the Linformer kernel needs max_length, the length of its projections")
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
        self.backend = backend
        self.feature_map = FEATURE_MAPS[kernel](stabilizer) if kernel in FEATURE_MAPS else None
        has_projection = kernel in FAVOR_KERNELS and feature_type != "deterministic"
        shape = (num_features, head_dim) if has_projection else (0, head_dim)
        self.register_buffer("projection", torch.zeros(shape), persistent=True)
        if has_projection:
            self.redraw(seed)
        self.bucket_size, self.n_hashes = bucket_size, n_hashes
        if kernel == "reformer":
            # The rotations are a function of this seed (drawn on first use, block by block as
            # lengths grow), so checkpoints and exports carry the seed, not the matrices.
            self.register_buffer("rotation_seed", torch.tensor(int(seed)), persistent=True)
            self._rotations: dict[tuple, Tensor] = {}
        if kernel == "linformer":
            self.proj_k = nn.Parameter(init_projection(torch.empty(max_length, linformer_k)))
            self.proj_v = nn.Parameter(init_projection(torch.empty(max_length, linformer_k)))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_features}, kernel={self.kernel!r}, "
            f"causal={self.causal}, feature_type={self.feature_type!r}, backend={self.backend!r}"
        )

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new random features (Reformer: rotations) from ``seed``: identical on every
        process given the same seed."""
        if self.kernel == "reformer":
            self.rotation_seed.fill_(int(seed))
            self._rotations.clear()
            return
        if self.projection.shape[0] == 0:
            return
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if self.feature_type == "orthogonal":
            new = gaussian_orthogonal_projection(
                self.num_features, self.head_dim, generator=generator
            )
        else:
            new = gaussian_iid_projection(self.num_features, self.head_dim, generator=generator)
        self.projection.copy_(new.to(self.projection.device))

    def feature_weights(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The (d, m) matrix the fused kernels multiply by (None: no projection)."""
        if self.projection.shape[0] == 0:
            return None
        scale = self.head_dim**-0.25 if self.kernel == "softmax" else 1.0
        return (self.projection.to(dtype) * scale).T.contiguous()

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """Attend. q, k, v: (B, H, L, d); key_padding_mask: (B, L) bool, True = padding.

        Returns (B, H, L, d) in v's dtype, zero at padded positions. FAVOR+ runs in float32
        (also under autocast), so that features and their sums stay finite at any length.
        """
        if self.kernel == "exact":
            out = self._exact(q, k, v, key_padding_mask)
        elif self.kernel == "reformer":
            out = self._reformer(q, v, key_padding_mask)
        elif self.kernel == "linformer":
            valid = None if key_padding_mask is None else ~key_padding_mask
            out = linformer_attention(q, k, v, self.proj_k, self.proj_v, valid)
        elif self.uses_triton(q):
            return self._favor_triton(q, k, v, key_padding_mask)  # zero at padding already
        else:
            out = self._favor(q, k, v, key_padding_mask)
        if key_padding_mask is not None:
            out = out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        return out

    def uses_triton(self, x: Tensor) -> bool:
        """Whether FAVOR+ on tensors like ``x`` runs the Triton kernels (see ``backend``).

        ``"triton"`` raises where they cannot run: without Triton, on CPU tensors outside the
        interpreter, or in float64 (the kernels compute in float32; ``"torch"`` does float64).
        """
        if self.kernel not in FAVOR_KERNELS or self.backend == "torch":
            return False
        from protperf.favor import triton as favor_triton

        if self.backend == "auto":
            return (
                x.is_cuda
                and x.dtype != torch.float64
                and self.head_dim <= 256
                and favor_triton.available()
            )
        if not favor_triton.available():
            raise RuntimeError("backend='triton' needs Triton: pip install triton")
        if not x.is_cuda and not favor_triton.interpreting():
            raise ValueError(
                "backend='triton' runs on CUDA tensors (on CPU ones only under TRITON_INTERPRET=1)"
            )
        if x.dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32; use 'torch' for float64")
        return True

    def _favor_triton(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> Tensor:
        # The kernels read q, k, v in their dtype and strides and compute in float32 whatever
        # autocast says; the output comes back in v's dtype, laid out as (B, L, H, d).
        return _uncompiled(_run_triton)(
            q, k, v, self.feature_weights(), key_padding_mask, self.causal,
            self.kernel == "softmax", self.feature_map.eps,
        )  # fmt: skip

    def rotations(self, columns: int, device: torch.device) -> Tensor:
        """Reformer's rotations (head_dim, n_hashes, >= columns) from ``rotation_seed``."""
        key = (device, int(self.rotation_seed))
        cached = self._rotations.get(key)
        if cached is None or cached.shape[-1] < columns:
            drawn = draw_rotations(self.head_dim, self.n_hashes, columns, int(self.rotation_seed))
            cached = self._rotations[key] = drawn.to(device)
        return cached

    def _reformer(self, qk: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        batch, heads, length, dim = qk.shape
        rows = batch * heads
        dtype = torch.promote_types(qk.dtype, torch.float32)
        with torch.autocast(device_type=qk.device.type, enabled=False):
            qk32, v32 = (_contiguous_as(x, dtype).view(rows, length, dim) for x in (qk, v))
            valid = None
            if key_padding_mask is not None:
                valid = ~key_padding_mask[:, None, :].expand(batch, heads, length)
                valid = valid.reshape(rows, length)
            columns = -(-length // (2 * self.bucket_size))
            rotations = self.rotations(columns, qk.device)
            out = lsh_attention(
                qk32, v32, rotations, bucket_size=self.bucket_size, causal=self.causal, valid=valid
            )
        return out.view(batch, heads, length, dim).to(v.dtype)

    def _favor(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        batch, heads, length, dim = q.shape
        rows = batch * heads
        # float32 at least (float64 stays float64), whatever autocast or the inputs say.
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            # A model's q, k, v are views of one projection, heads interleaved: rows made
            # contiguous here, in the same pass as any cast (none when they already are),
            # not cloned by every chunk product of the kernels.
            q32, k32, v32 = (_contiguous_as(x, dtype).view(rows, length, dim) for x in (q, k, v))
            valid = None
            if key_padding_mask is not None:
                valid = ~key_padding_mask[:, None, :, None].expand(batch, heads, length, 1)
                valid = valid.reshape(rows, length, 1)
            feature_map = self.feature_map
            w = self.feature_weights(dtype)
            if not self.causal:
                out = BidirectionalFavor.apply(q32, k32, v32, w, valid, feature_map)
            else:
                chunk = min(self.chunk_size, length)
                extra = -length % chunk
                if extra:
                    # Pad to whole chunks; the extra keys are invalid, the extra rows dropped.
                    q32, k32, v32 = (F.pad(x, (0, 0, 0, extra)) for x in (q32, k32, v32))
                    if valid is None:
                        valid = q32.new_ones(rows, length, 1, dtype=torch.bool)
                    valid = F.pad(valid, (0, 0, 0, extra), value=False)
                out = CausalFavor.apply(q32, k32, v32, w, valid, feature_map, chunk)[:, :length]
        return out.reshape(batch, heads, length, dim).to(v.dtype)

    @torch.no_grad()
    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: DecodeState | None = None
    ) -> tuple[Tensor, DecodeState]:
        """One decoding step of causal attention: q, k, v (B, H, 1, d) -> (B, H, 1, d), new state.

        FAVOR+ (:func:`protperf.favor.causal_step`, in float32 at least) keeps an m x (d+1) state
        per head, so a step costs O(m d) whatever the position. The result equals the causal
        forward pass at that position (both scale keys by the running max of their logits, which
        only the past determines), up to rounding. Exact attention keeps the past keys and values.
        """
        if not self.causal:
            raise RuntimeError("step() decodes causal attention; this module is bidirectional")
        if self.kernel not in (*FAVOR_KERNELS, "exact"):
            raise RuntimeError(NO_STEP.format(kernel=KERNEL_NAMES[self.kernel]))
        if self.kernel == "exact":
            keys = k if state is None else torch.cat([state.context, k], dim=-2)
            values = v if state is None else torch.cat([state.value_sum, v], dim=-2)
            out = F.scaled_dot_product_attention(q, keys, values)
            return out, DecodeState(keys, values)
        dtype = v.dtype
        compute = torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        out, state = causal_step(q, k, v, self.feature_weights(compute), self.feature_map, state)
        return out.to(dtype), state

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
