"""Process-level settings that make large CPU tensors cheap to allocate and subnormals free.

PyTorch's CPU allocator asks glibc for every tensor. By default glibc returns freed memory to the
system quickly, so the next tensor of the same size is page-faulted in again, which for FAVOR+
(several L x m tensors per layer and step) costs as much as the arithmetic. Two settings:

* ``"default"``: keep freed blocks under 32 MB in the process (no trimming; glibc's largest
  heap block: a block of 32 MB or more is still a fresh mmap, faulted in on every use) and back
  large tensors with transparent huge pages. The FAVOR+ kernels keep their temporaries under
  32 MB (protperf.favor.BLOCK_BYTES: blocks of rows, and position segments of a longer row), so
  they are recycled, not faulted.
* ``"aggressive"``: never mmap at all, so every freed block is reused. Faster still for large
  models (whose activations exceed 32 MB), at the price of a higher peak RSS from fragmentation
  (docs/benchmarks.md, training throughput).

The CLI and the benchmarks call :func:`tune_process` once at start-up (benchmarks for every
contender alike). ``PROTPERF_TUNE_ALLOCATOR=0|default|aggressive`` chooses (default: default).
This is Intel's advice for PyTorch on CPUs (jemalloc/tcmalloc) without an extra library.

:func:`flush_denormals` turns on flush-to-zero (x86 FTZ/DAZ) for every thread of the process:
subnormal floats (below 1.2e-38 in float32) cost 4-10x more per operation on x86, and trained
models make them (exact attention's probabilities and FAVOR+ features, once q and k grow a few
times their norms at initialisation, run several times slower). The setting is per
thread and a new thread copies its creator's, so it must be made before PyTorch starts its
intra-op thread pool (its first parallel operation); made later, it reaches the calling thread
only. The CLI calls it first thing for the verbs that run models; TensorFlow and JAX do the same
by default. ``PROTPERF_FLUSH_DENORMAL=0`` keeps IEEE subnormals.

:func:`float32_matmul_precision` sets ``torch.set_float32_matmul_precision`` for a block only
(``train``, ``embed`` and ``evaluate`` run their models under it; default ``high``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Literal

#: ``torch.set_float32_matmul_precision`` values, as the verbs' --float32-matmul-precision takes.
MatmulPrecision = Literal["highest", "high", "medium"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_LARGEST_HEAP_BLOCK = 32 << 20  # glibc refuses a larger mmap threshold
_tuned: str | None = None


def tune_cpu_allocator(mode: str | None = None) -> bool:
    """Apply the allocator settings (glibc on Linux); returns whether they are in effect.

    ``mode``: "default", "aggressive" or "0" (off); None reads ``PROTPERF_TUNE_ALLOCATOR``.
    Call it before importing torch for the huge-page part (``THP_MEM_ALLOC_ENABLE`` is read at
    PyTorch's first allocation); the glibc part takes effect whenever it is called.
    """
    global _tuned
    mode = mode or os.environ.get("PROTPERF_TUNE_ALLOCATOR", "default")
    if mode in ("0", "off", "false"):
        return False
    if mode in ("1", "true"):
        mode = "default"
    if mode not in ("default", "aggressive"):
        raise ValueError(f"PROTPERF_TUNE_ALLOCATOR must be 0, default or aggressive, got {mode!r}")
    if _tuned == mode:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    ok = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if mode == "aggressive":
        ok = ok and bool(mallopt(_M_MMAP_MAX, 0))
    else:
        ok = ok and bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK))
    _tuned = mode if ok else None
    return ok


def flush_denormals() -> bool:
    """Make subnormal floats flush to zero in this process (x86); returns whether it is on.

    Imports torch. Call it before any parallel PyTorch operation (see the module docstring);
    ``PROTPERF_FLUSH_DENORMAL=0`` turns it off.
    """
    if os.environ.get("PROTPERF_FLUSH_DENORMAL", "1") in ("0", "off", "false"):
        return False
    import torch

    return bool(torch.set_flush_denormal(True))


def tune_process(*, runs_models: bool = True) -> None:
    """The ``protperf`` command's process settings: the allocator, and flush-to-zero when the
    process runs models (it imports torch). Call it before torch is imported or used."""
    tune_cpu_allocator()
    if runs_models:
        flush_denormals()


def no_primitive_cache() -> None:
    """Turn off oneDNN's cache of compiled CPU kernels (unless ONEDNN_PRIMITIVE_CACHE_CAPACITY
    is set), for verbs whose batches take ever new shapes (embed, score).

    The cache keeps up to 1,024 kernels, one per shape, at a few hundred kB each: embedding
    proteins of every length, the process grew by about 15 MB per million residues until it was
    full, while the kernels were not reused often enough to save time (the same speed without
    it). Takes effect when called before the process's first oneDNN operation.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


@contextlib.contextmanager
def float32_matmul_precision(precision: MatmulPrecision) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the previous after.

    "high" lets CUDA multiply float32 in TF32 (10-bit mantissa): FAVOR+ runs in float32 even
    under bf16 autocast, and IEEE float32 products on a GPU run at a fraction of its tensor
    cores' rate. On a CPU "high" changes nothing; "medium" makes oneDNN multiply float32 in
    bfloat16 (AMX) with float32 results.
    """
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
