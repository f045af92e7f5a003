"""Process-level settings that make large CPU tensors cheap to allocate.

PyTorch's CPU allocator asks glibc for every tensor; blocks above 32 MB are mmap'ed fresh each time
and page-faulted in again, which for FAVOR+ (a few L x m tensors per layer and step) costs more than
the arithmetic. Keeping freed memory inside the process (no mmap for large blocks, no trimming)
and backing large tensors with transparent huge pages removes most of that cost. The same advice
is Intel's for PyTorch on CPUs (jemalloc/tcmalloc); this needs no extra library.

The CLI and the benchmarks call :func:`tune_cpu_allocator` once at start-up (benchmarks for every
contender alike). Memory freed by a tuned process is reused by it, not returned to the system.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_cpu_allocator() -> bool:
    """Apply the allocator settings (glibc on Linux); returns whether they are in effect.

    Call it before importing torch for the huge-page part (``THP_MEM_ALLOC_ENABLE`` is read at
    PyTorch's first allocation); the glibc part takes effect whenever it is called.
    Set ``PROTPERF_TUNE_ALLOCATOR=0`` to skip.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("PROTPERF_TUNE_ALLOCATOR", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _tuned
