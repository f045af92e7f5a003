"""Seeds derived from seeds: splitmix64, for Python integers and numpy arrays alike.

Every seeded draw in protperf (feature redraws, per-sample crops and masks, generated proteins,
the concat shuffle) derives its seed here, so that the same arguments give the same stream on
every process, worker and machine.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_GOLDEN = 0x9E37_79B9_7F4A_7C15
_MIX1 = 0xBF58_476D_1CE4_E5B9
_MIX2 = 0x94D0_49BB_1331_11EB

Seedable = TypeVar("Seedable", int, np.ndarray)


def splitmix64(x: Seedable) -> Seedable:
    """One splitmix64 step: x + golden ratio, then the finaliser. An int in [0, 2^64) for an int,
    a uint64 array (element-wise, wrapping) for an array."""
    if isinstance(x, np.ndarray):
        with np.errstate(over="ignore"):
            z = x.astype(np.uint64) + np.uint64(_GOLDEN)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
            return z ^ (z >> np.uint64(31))
    z = (int(x) + _GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *salts: int) -> int:
    """A 63-bit seed for ``seed`` and integer salts (negative ones too); equal on every process.

    The seed is mixed first, then each salt is folded in through the mixer, so that every
    (seed, salts...) tuple has its own stream: neither ``(seed + 1, salt)`` and ``(seed, salt +
    1)`` nor ``(a, b)`` and ``(b, a)`` give the same value, as they would if the numbers were
    added or xor-ed before mixing. splitmix64 is a bijection of 64-bit integers, so two tuples
    that differ in one position only never collide before the final bit is dropped.
    """
    state = splitmix64(int(seed) & MASK64)
    for salt in salts:
        state = splitmix64(state ^ (int(salt) & MASK64))
    return state >> 1
