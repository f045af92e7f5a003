"""The prepared GPU checks (scripts/device_check.sh, device_cli_check.sh,
device_triton_check.sh) stay runnable: their CPU dry runs pass.

No GPU runs in CI; the dry run executes every step of the script with DEVICE=cpu and small sizes,
so that a renamed benchmark option or a broken check fails here rather than in the few minutes of
a lent GPU.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
from Bio import SeqIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import cuda_check  # noqa: E402


def run_script(name: str, **env: str) -> None:
    """Run scripts/NAME with ``env`` added (DEVICE=cpu, this Python); fails the test if it fails."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / name)],
        env={**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, **env},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_cuda_checks_pass_on_the_cpu_against_itself(tmp_path, capsys):
    out = tmp_path / "checks.json"
    assert cuda_check.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    checks = json.loads(out.read_text())["checks"]
    assert set(checks) == set(cuda_check.CHECKS)
    assert all(check["passed"] for check in checks.values())
    assert capsys.readouterr().out.count("PASS") == len(cuda_check.CHECKS)


def test_a_failing_check_fails_the_run(monkeypatch, tmp_path):
    def broken(device, size):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    name = next(iter(cuda_check.CHECKS))
    monkeypatch.setitem(cuda_check.CHECKS, name, (broken, 1, 1))
    out = tmp_path / "checks.json"
    assert cuda_check.main(["--device", "cpu", "--quick", "--json", str(out)]) == 1
    failed = json.loads(out.read_text())["checks"][name]
    assert not failed["passed"] and "illegal memory access" in failed["measure"]


def test_device_script_dry_run_runs_every_step(tmp_path):
    run_script("device_check.sh", QUICK="1", OUT=str(tmp_path))
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    steps = [line.split(":")[0] for line in summary]
    assert steps[-3:] == ["cuda_check", "attention_fp32", "train_throughput"]
    assert all(" exit 0" in line for line in summary)
    attention = json.loads((tmp_path / "attention_fp32.json").read_text())
    assert attention, "the attention benchmark wrote no results"
    assert "FAVOR+ causal" in (tmp_path / "train_throughput.log").read_text()
    assert len(list(tmp_path.iterdir())) <= 8, "the device tool returns at most 8 files"


def test_device_cli_script_dry_run_runs_every_verb(tmp_path, tiny_lm_data, proteome_dir):
    """scripts/device_cli_check.sh on the CPU: train, evaluate, embed and generate all produce."""
    data = tmp_path / "devdata"
    data.mkdir()
    (data / "data").symlink_to(tiny_lm_data)
    fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    with gzip.open(fasta, "rt") as handle:
        records = list(SeqIO.parse(handle, "fasta"))[:12]
    SeqIO.write(records, data / "sample.fasta", "fasta")
    out = tmp_path / "out"
    run_script(
        "device_cli_check.sh", OUT=str(out), DATA=str(data), RUN=str(tmp_path / "run"), STEPS="12"
    )
    assert (out / "cuda_check.log").read_text().count("PASS") == len(cuda_check.CHECKS)
    assert "empirical unigram baseline" in (out / "evaluate.log").read_text()
    with h5py.File(out / "embeddings.h5") as embeddings:
        assert [x.decode() for x in embeddings["ids"][:]] == [r.id for r in records]
        assert embeddings["residues"].shape[0] == sum(len(r.seq) for r in records)
    assert (out / "generated.fasta").read_text().count(">") == 3
    compiled = (out / "compile.log").read_text()
    assert compiled.count('"config": "FAVOR+ causal", "length": 256, "step_s"') == 2, compiled
    assert compiled.count(", eager\n") == compiled.count(", torch.compile\n") == 1
    profiled = [line for line in compiled.splitlines() if "wall" in line and "kernels" in line]
    assert len(profiled) == 4  # both directions at 256 and 512
    assert "error" not in compiled and "timeout" not in compiled
    assert len(list(out.iterdir())) <= 8, "the device tool returns at most 8 files"


def test_triton_device_script_dry_run_runs_every_step(tmp_path):
    """scripts/device_triton_check.sh on the CPU, the Triton kernels under Triton's interpreter:
    the checks (the Triton ones too) pass, the attention benchmark has the Triton contender,
    the training benchmark runs the Triton backend, and the longest-L search reports."""
    run_script("device_triton_check.sh", OUT=str(tmp_path))
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["checks", "attention", "train", "long"]
    assert all(" exit 0" in line for line in summary)
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert set(checks) == set(cuda_check.TRITON_CHECKS)
    assert all(check["passed"] for check in checks.values())
    protein = checks["protein batches: Triton and PyTorch vs float64"]["measure"]
    assert "Triton / PyTorch: softmax causal" in protein
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert {row["implementation"] for row in attention} == {"protperf", "protperf-triton", "exact"}
    assert all("time_s" in row for row in attention), attention
    assert "FAVOR+ backend triton" in (tmp_path / "train.log").read_text()
    long = (tmp_path / "long.log").read_text()
    assert "gradient checkpointing" in long and "longest FAVOR+ causal: L = " in long
    assert len(list(tmp_path.iterdir())) <= 8, "the device tool returns at most 8 files"
