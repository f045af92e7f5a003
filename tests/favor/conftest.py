"""The FAVOR+ op tests. Triton's kernels (protperf.favor.triton) run here under Triton's CPU
interpreter, on CPU tensors: no GPU in CI. Triton reads TRITON_INTERPRET when a kernel is
decorated, that is when protperf.favor.triton's kernel modules are first imported, which
protperf does only when a Triton kernel first runs, after this."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
