"""Process settings: the CPU allocator (Linux, selectable, harmless to results) and flush-to-zero."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from protperf import cli

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


#: Multiplies 2**20 float32 values into the subnormal range (1e-30 * 1e-10 = 1e-40) in a parallel
#: operation; prints how many results are subnormal (0 when every thread flushes to zero).
SUBNORMAL_PROBE = (
    "import torch; torch.set_num_threads(2); "
    "y = torch.full((1 << 20,), 1e-30) * torch.full((1 << 20,), 1e-10); "
    "print(int((y != 0).sum()))"
)


def run_python(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.strip()


def test_without_flush_the_probe_sees_subnormals():
    assert int(run_python(SUBNORMAL_PROBE)) == 1 << 20


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="flush-to-zero is an x86 setting"
)
def test_flush_denormals_reaches_every_thread_of_the_pool():
    on = "import protperf.runtime as r; print(r.flush_denormals()); " + SUBNORMAL_PROBE
    assert run_python(on).split() == ["True", "0"]
    assert run_python(on, PROTPERF_FLUSH_DENORMAL="0").split() == ["False", str(1 << 20)]


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="flush-to-zero is an x86 setting"
)
@pytest.mark.parametrize("verb", ["generate", "prepare-data"])
def test_model_verbs_flush_subnormals(verb):
    """The CLI turns flush-to-zero on before a model verb's torch starts its threads."""
    code = (
        "import contextlib, sys; from protperf import cli\n"
        f"with contextlib.suppress(SystemExit), contextlib.redirect_stdout(sys.stderr):\n"
        f"    cli.main([{verb!r}, '--help'])\n" + SUBNORMAL_PROBE.replace("; ", "\n")
    )
    subnormal = int(run_python(code))
    assert subnormal == (0 if verb in cli.MODEL_VERBS else 1 << 20)


@pytest.mark.parametrize("verb", ["embed", "evaluate"])
def test_inference_verbs_run_the_model_under_their_matmul_precision(
    verb, trained_tiny_runs, tiny_lm_data, tmp_path, monkeypatch
):
    """--float32-matmul-precision holds while embed / evaluate run the model, and only then."""
    import torch

    from protperf.model import PerformerLM

    seen = []
    forward = PerformerLM.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PerformerLM, "forward", spy)
    before = torch.get_float32_matmul_precision()
    run = str(trained_tiny_runs["unidirectional"])
    if verb == "embed":
        fasta = tmp_path / "two.fasta"
        fasta.write_text(">a\nMKTAYIAKQR\n>b\nMSLLE\n")
        args = [str(fasta), "--model", run, "-o", str(tmp_path / "two.h5")]
    else:
        args = ["--model", run, "--data", str(tiny_lm_data), "--split", "test"]
    assert before != "medium"
    assert cli.main([verb, *args, "--float32-matmul-precision", "medium"]) == 0
    assert seen and set(seen) == {"medium"}
    assert torch.get_float32_matmul_precision() == before
    if verb == "embed":  # recorded with the embeddings
        import h5py

        with h5py.File(tmp_path / "two.h5") as f:
            assert f.attrs["float32_matmul_precision"] == "medium"
