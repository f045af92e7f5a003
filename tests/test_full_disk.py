"""A full disk is bad input like any other, on a real full file system (a 3 MB tmpfs): every verb
that writes says in one line which path has no space, exits 1 without a traceback or a crash,
and leaves the earlier output, or nothing.

Mounting needs root (CI runs as root); elsewhere the tests are skipped, and under CI=true they
fail. prepare-data and embed run as processes of their own: HDF5 used to crash the process
(exit 139) after a failed write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lm_data import ecoli_fasta
from lm_models import TINY_TRAIN_ARGS, export_random_model

from protperf import cli

REPO = Path(__file__).resolve().parents[1]
FULL = "the disk is full"


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def contents(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too): path -> digest ("" for folders)."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        )
        for path in sorted(folder.rglob("*"))
    }


def protperf(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "protperf", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def one_line(stderr: str, verb: str) -> str:
    """The last line of ``stderr``, which must be the verb's only error line, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line.split("\r")[-1] for line in stderr.splitlines() if line.strip()]
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], stderr
    assert lines[-1].startswith(f"protperf {verb}: error: "), stderr
    return lines[-1]


@pytest.fixture(scope="module")
def fasta(proteome_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("full-disk") / "ecoli.fasta"
    ecoli_fasta(proteome_dir, path, 160)
    return path


def test_prepare_data_keeps_the_earlier_dataset(disk, proteome_dir, tiny_lm_data, tmp_path):
    out = disk / "data"
    shutil.copytree(tiny_lm_data, out)
    before = contents(disk)
    source = proteome_dir / "UP000000625-E.coli.fasta.gz"
    args = ["prepare-data", "--source", source, "--out", out, "--quiet", "--overwrite"]
    done = protperf([*args, "--concat-length", 256], tmp_path)
    assert done.returncode == 1, done.stderr  # not 139: no crash
    assert one_line(done.stderr, "prepare-data").startswith(
        f"protperf prepare-data: error: {out}: {FULL}; "
    )
    assert contents(disk) == before


def test_embed_leaves_nothing(disk, fasta, tmp_path):
    model = export_random_model(tmp_path / "model")
    out = disk / "out.h5"
    done = protperf(["embed", fasta, "--model", model, "-o", out, "--per-residue"], tmp_path)
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr, "embed")
    assert line.startswith(f"protperf embed: error: {disk}/out.h5") and FULL in line, line
    assert contents(disk) == {}


def test_train_keeps_its_checkpoints_and_says_how_to_go_on(disk, tiny_lm_data, capsys):
    fill(disk, leave=64 << 10)  # the settings fit, a checkpoint does not
    run_dir = disk / "run"
    args = ["train", "--data", tiny_lm_data, "--run-dir", run_dir, *TINY_TRAIN_ARGS]
    assert cli.main([*map(str, args), "--trainer.max_steps=4"]) == 1
    line = one_line(capsys.readouterr().err, "train")
    assert line.startswith(f"protperf train: error: {run_dir}"), line
    assert line.endswith(f"{FULL}; the checkpoints already in {run_dir / 'checkpoints'} are kept: "
                         "free some space, then --resume"), line  # fmt: skip
    assert not [
        path for path in run_dir.rglob("*") if ".tmp" in path.name or "partial" in path.name
    ]
    assert not (run_dir / "export").exists()


@pytest.mark.parametrize("verb", ["generate", "score"])
def test_generate_and_score_keep_the_earlier_file(verb, disk, fasta, tmp_path, capsys):
    model = export_random_model(tmp_path / "model", causal=True)
    out = disk / "out.txt"
    out.write_text("an earlier result\n")
    fill(disk, leave=0)
    before = contents(disk)
    args = {
        "generate": ["generate", "--model", model, "-n", 200, "--max-length", 100],
        "score": ["score", fasta, "--model", model],
    }[verb]
    assert cli.main([*map(str, args), "-o", str(out), "--overwrite"]) == 1
    assert one_line(capsys.readouterr().err, verb).startswith(
        f"protperf {verb}: error: {out}: {FULL}; nothing was replaced or left half-written"
    )
    assert contents(disk) == before


def test_export_leaves_nothing(disk, tmp_path, capsys):
    model = export_random_model(tmp_path / "model")
    fill(disk, leave=16 << 10)
    before = contents(disk)
    out = disk / "copy"
    assert cli.main(["export", str(model), str(out)]) == 1
    assert one_line(capsys.readouterr().err, "export").startswith(
        f"protperf export: error: {out}: {FULL}; "
    )
    assert contents(disk) == before
