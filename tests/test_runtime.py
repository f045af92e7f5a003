"""The CPU allocator setting: applied on Linux, skippable, and harmless to results."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, protperf.runtime as r; ok = r.tune_cpu_allocator(); "
    "print(ok, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
)


def run_probe(**env: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return completed.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc allocator settings are Linux-only"
)
def test_tuning_applies_and_can_be_disabled():
    assert run_probe(PROTPERF_TUNE_ALLOCATOR="1") == "True 1"
    assert run_probe(PROTPERF_TUNE_ALLOCATOR="0") == "False None"


def test_tuned_process_computes_the_same_attention():
    code = (
        "import sys, protperf.runtime as r; r.tune_cpu_allocator() if sys.argv[1] == '1' else None; "
        "import torch; from protperf.attention import FastAttention; torch.manual_seed(0); "
        "q = torch.randn(1, 2, 300, 16); a = FastAttention(head_dim=16, num_features=32, causal=True); "
        "print(float(a(q, q, q).double().sum()))"
    )
    results = [
        subprocess.run(
            [sys.executable, "-c", code, flag], capture_output=True, text=True, check=True
        ).stdout
        for flag in ("0", "1")
    ]
    assert results[0] == results[1]
