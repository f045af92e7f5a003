"""FAVOR+ on GPUs: fused Triton kernels for both feature maps and both directions.

The PyTorch kernels of :mod:`protperf.favor` stay the CPU path and the reference; these compute
the same outputs (up to rounding) in a handful of launches per forward and backward, with the
features formed tile by tile in registers and never written to memory. One file per algorithm,
beside its reference: :mod:`~protperf.favor.triton.features` (feature maps, per-position
statistics), :mod:`~protperf.favor.triton.bidirectional`, :mod:`~protperf.favor.triton.causal`.

Triton is imported only when a kernel runs, so protperf imports and runs without it. The
kernels take CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before the first kernel is imported), which is how the test suite runs them without a GPU.

Entry points (q, k, v (B, H, L, d); w (d, m) float32 or None; key_padding_mask (B, L) bool or
None, True at padding):
    bidirectional_favor(q, k, v, w, key_padding_mask, softmax=..., eps=...) -> (B, H, L, d)
    causal_favor(q, k, v, w, key_padding_mask, softmax=..., eps=...) -> (B, H, L, d)
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor


def available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a module "triton" that was blocked or stubbed
        return False


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is asked for (TRITON_INTERPRET)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def bidirectional_favor(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor | None,
    key_padding_mask: Tensor | None = None,
    **options,
) -> Tensor:
    """:func:`protperf.favor.triton.bidirectional.bidirectional_favor`, imported on first use."""
    from protperf.favor.triton import bidirectional

    return bidirectional.bidirectional_favor(q, k, v, w, key_padding_mask, **options)


def causal_favor(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor | None,
    key_padding_mask: Tensor | None = None,
    **options,
) -> Tensor:
    """:func:`protperf.favor.triton.causal.causal_favor`, imported on first use."""
    from protperf.favor.triton import causal

    return causal.causal_favor(q, k, v, w, key_padding_mask, **options)
