"""The CPU allocator setting: applied on Linux, selectable, and harmless to results."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, protperf.runtime as r; ok = r.tune_cpu_allocator(); "
    "print(ok, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
)


def run_probe(**env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**environment, **env}
    )


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc allocator settings are Linux-only"
)
def test_modes_apply_and_can_be_disabled():
    for mode in ("default", "aggressive", "1"):
        assert run_probe(PROTPERF_TUNE_ALLOCATOR=mode).stdout.strip() == "True 1"
    assert run_probe(PROTPERF_TUNE_ALLOCATOR="0").stdout.strip() == "False None"
    failed = run_probe(PROTPERF_TUNE_ALLOCATOR="fastest")
    assert failed.returncode != 0 and "PROTPERF_TUNE_ALLOCATOR" in failed.stderr


def test_tuned_process_computes_the_same_attention():
    code = (
        "import sys, protperf.runtime as r; r.tune_cpu_allocator(sys.argv[1]); "
        "import torch; from protperf.attention import FastAttention; torch.manual_seed(0); "
        "q = torch.randn(1, 2, 300, 16); a = FastAttention(head_dim=16, num_features=32, causal=True); "
        "print(float(a(q, q, q).double().sum()))"
    )
    results = {
        subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
        ).stdout
        for mode in ("0", "default", "aggressive")
    }
    assert len(results) == 1
