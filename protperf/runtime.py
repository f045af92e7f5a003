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

Threads: a verb's ``--threads N`` (:func:`set_threads`) sets the intra-op threads of its process
and of the processes it launches. Without it PyTorch's default stands (OMP_NUM_THREADS when set,
else one thread per core), except that several processes of one run on one machine share its
cores (:func:`share_cores`), as Lightning's launcher and torchrun do: threads of processes that
compete for the same cores wait on each other at every operation (several times slower).
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


#: Launcher variables that say this process is one of several.
_WORLD_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")


def one_of_several() -> bool:
    """Whether a launcher (torchrun, SLURM, Lightning's) started this process as one of several."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _WORLD_VARIABLES)


def tune_process(*, runs_models: bool = True) -> None:
    """The ``protperf`` command's process settings: the allocator, and flush-to-zero when the
    process runs models (it imports torch). Call it before torch is imported or used.

    A process started as one of several keeps torch's C++ warnings quiet (TORCH_CPP_LOG_LEVEL
    ERROR, unless set): when another process is lost, torch.distributed's store client prints a
    C++ stack for each request it fails, while protperf.peers says in one line what was lost.
    """
    tune_cpu_allocator()
    if runs_models and one_of_several():
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if runs_models:
        flush_denormals()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a job's share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """Run this process's operations on ``threads`` intra-op threads, and tell the processes it
    starts (OMP_NUM_THREADS) to do the same."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def share_cores(local_processes: int) -> int | None:
    """Give each of ``local_processes`` processes of one run on this machine an equal share of
    its cores (at least one thread), unless the threads were chosen (``--threads`` or
    OMP_NUM_THREADS); returns the threads set, or None when nothing changed. Call it before the
    other processes start: they inherit OMP_NUM_THREADS."""
    if local_processes < 2 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, available_cores() // local_processes)
    set_threads(threads)
    return threads


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
