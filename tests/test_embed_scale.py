"""`protperf embed` at scale, on real E. coli proteins: the streaming plan cut by tokens, shards
that do not change the numbers, two processes (gloo, started by `--devices 2` and by torchrun)
writing exactly the one-process file, and a SIGKILLed run resumed from the shards it wrote."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from lm_data import ecoli_fasta, h5_contents
from lm_models import export_random_model

from protperf import cli
from protperf.fasta import FastaReader, read_fasta
from protperf.shards import assign_shards, open_shard_folder, plan_shards, shard_folder

pytestmark = pytest.mark.usefixtures("single_torch_thread")
MODEL = "performer-small-uni"  # the packaged model: slow enough on a CPU to be killed midway
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fasta(proteome_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("embed-scale") / "ecoli.fasta"
    ecoli_fasta(proteome_dir, path, 160)
    return path


def protperf(args: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return _finish(_start(["-m", "protperf", *args], cwd, **env))


def _start(args: list, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_environment(**env))  # fmt: skip


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _environment(**env: str) -> dict[str, str]:
    # One thread a process: equal thread counts give bitwise-equal products in every process.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}


def assert_same_file(a: Path, b: Path, *, except_attrs: tuple[str, ...] = ()) -> None:
    first, second = h5_contents(a), h5_contents(b)
    for name in except_attrs:
        first.pop(f"@{name}"), second.pop(f"@{name}")
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name


class SeekLog:
    """A file object that records each seek: (position before, target)."""

    def __init__(self, handle) -> None:
        self.handle, self.seeks = handle, []

    def seek(self, target: int) -> int:
        self.seeks.append((self.handle.tell(), target))
        return self.handle.seek(target)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def test_the_plan_cuts_by_tokens_and_covers_every_record(fasta, tmp_path):
    records = fasta.read_text().split(">")[1:]
    bad = {0: "empty\n\n", 57: "gappy\nMKT-ACD\n", len(records): "last\nMK1\n"}
    for position in sorted(bad, reverse=True):
        records.insert(position, bad[position])
    mixed = tmp_path / "mixed.fasta.gz"
    mixed.write_bytes(gzip.compress("".join(">" + r for r in records).encode()))
    budget = 5000
    plan = plan_shards(mixed, shard_tokens=budget, skip_invalid=True)
    valid, skipped = read_fasta(mixed, skip_invalid=True)

    assert [s.id for s in plan.skipped] == [s.id for s in skipped] == ["empty", "gappy", "last"]
    assert plan.shards[0].first == 1 and [s.index for s in plan.shards] == list(
        range(len(plan.shards))
    )
    for shard, following in zip(plan.shards, plan.shards[1:], strict=False):
        assert following.first == shard.first + shard.records  # consecutive, nothing left out
    assert sum(s.records for s in plan.shards) == len(records)
    read = []
    with FastaReader(mixed) as reader:
        for shard in plan.shards:
            part = reader.records(shard.offset, shard.records)
            assert len(part) == shard.proteins
            assert sum(len(r.sequence) for r in part) == shard.residues
            assert shard.tokens <= budget or shard.proteins == 1
            read.extend(part)
    assert read == valid
    # Every other shard (one rank's share), read forward: the gzip stream never starts over.
    with FastaReader(mixed) as reader:
        reader._handle = handle = SeekLog(reader._handle)
        share = [r for s in plan.shards[1::2] for r in reader.records(s.offset, s.records)]
    assert handle.seeks and all(target >= position for position, target in handle.seeks)
    ends = np.cumsum([0] + [s.proteins for s in plan.shards])
    assert share == [r for i in range(1, len(plan.shards), 2) for r in valid[ends[i] : ends[i + 1]]]
    # Greedy: each shard but the last is full, the next protein would not have fitted.
    starts = np.cumsum([0] + [s.proteins for s in plan.shards])
    for shard, start in zip(plan.shards[:-1], starts[1:], strict=False):
        assert shard.tokens + len(valid[start].sequence) + 2 > budget

    for ranks in (1, 2, 3):
        shares = assign_shards(plan.shards, ranks)
        assert sorted(s.index for share in shares for s in share) == list(range(len(plan.shards)))
        assert all([s.index for s in share] == sorted(s.index for s in share) for share in shares)
        loads = [sum(s.tokens for s in share) for share in shares]
        assert max(loads) - min(loads) <= max(s.tokens for s in plan.shards)


def test_shards_and_compression_do_not_change_the_numbers(fasta, tmp_path):
    model = export_random_model(tmp_path / "model")
    gz = tmp_path / "ecoli.fasta.gz"
    gz.write_bytes(gzip.compress(fasta.read_bytes()))
    common = ["--model", model, "--per-residue", "--layers", "1", "-1"]
    runs = {"whole": (fasta, []), "sharded": (fasta, ["--shard-tokens", 3000]),
            "sharded-gz": (gz, ["--shard-tokens", 3000])}  # fmt: skip
    for name, (source, extra) in runs.items():
        out = tmp_path / f"{name}.h5"
        assert cli.main(["embed", *map(str, [source, *common, "-o", out, *extra])]) == 0
        assert not shard_folder(out).exists()
    whole, sharded = h5_contents(tmp_path / "whole.h5"), h5_contents(tmp_path / "sharded.h5")
    assert list(sharded["ids"].astype(str)) == [r.id for r in read_fasta(fasta)[0]]
    for name in ("ids", "descriptions", "offsets"):
        assert np.array_equal(whole[name], sharded[name]), name
    for name in ("mean", "residues"):  # other batches: equal up to float rounding
        np.testing.assert_allclose(sharded[name], whole[name], rtol=0, atol=2e-5)
    assert_same_file(tmp_path / "sharded.h5", tmp_path / "sharded-gz.h5", except_attrs=("fasta",))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(fasta, tmp_path_factory) -> tuple[list, Path]:
    """The arguments of the multi-process runs, and the file one process writes with them."""
    args = [fasta, "--model", MODEL, "--per-residue", "--shard-tokens", 6000]
    folder = tmp_path_factory.mktemp("one-process")
    run = protperf(["embed", *args, "-o", "one.h5"], folder)
    assert run.returncode == 0, run.stderr
    return args, folder / "one.h5"


def _slurm_task(rank: int, port: int) -> dict[str, str]:
    """The variables srun gives task ``rank`` of 2 on one node (--ntasks-per-node 2)."""
    return {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_JOB_NAME": "embed", "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}  # fmt: skip


@pytest.mark.parametrize("launcher", ["devices", "torchrun", "slurm"])
def test_two_processes_write_exactly_the_one_process_file(one_process, launcher, tmp_path):
    """Two ranks started by `--devices 2` (Lightning), by torchrun or by SLURM's variables (as
    srun sets them, for two tasks on one node): Lightning reads their ranks as for train."""
    args, one = one_process
    command = ["-m", "protperf", "embed", *map(str, args), "-o", "two.h5", "--devices", "2"]
    if launcher == "devices":
        runs = [protperf(command[2:], tmp_path)]
    elif launcher == "torchrun":
        torchrun = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]  # fmt: skip
        runs = [_finish(_start([*torchrun, *command], tmp_path))]
    else:
        port = _free_port()
        tasks = [_start(command, tmp_path, **_slurm_task(rank, port)) for rank in range(2)]
        runs = [_finish(task) for task in tasks]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "two.h5" in runs[0].stdout.splitlines() and "on 2 processes" in runs[0].stderr
    assert_same_file(one, tmp_path / "two.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.h5"]  # no shards left


def test_bad_input_with_two_processes_is_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMKT\n>b\nMK#T\n")
    run = protperf(["embed", bad, "--model", MODEL, "--devices", 2], tmp_path)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("protperf embed: error:")]
    assert errors == [f"protperf embed: error: {bad}: 1 invalid record(s) (pass --skip-invalid "
                      "to skip them):"], run.stderr  # fmt: skip
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]


def test_devices_that_contradict_the_launcher_are_one_line(fasta, tmp_path):
    run = protperf(["embed", fasta, "--model", MODEL, "-o", "out.h5"], tmp_path,
                   **_slurm_task(0, _free_port()))  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1].startswith(
        "protperf embed: error: --devices 1 --num-nodes 1: "
    )
    assert "--ntasks-per-node=2" in run.stderr and list(tmp_path.iterdir()) == []


def test_a_killed_run_resumes_from_the_shards_it_wrote(fasta, tmp_path):
    args = ["embed", fasta, "--model", MODEL, "--shard-tokens", 3000, "--per-residue"]
    clean = protperf([*args, "-o", "clean.h5"], tmp_path)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out.h5"
    folder = shard_folder(out)
    child = subprocess.Popen(
        [sys.executable, "-m", "protperf", *map(str, args), "-o", out], cwd=tmp_path,
        env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(folder.glob("shard-*.h5"))) < 3 and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    written = sorted(p.name for p in folder.glob("shard-*.h5"))
    total = len(plan_shards(fasta, shard_tokens=3000).shards)
    assert 3 <= len(written) < total and not out.exists()
    for name in written:  # atomic: each is whole
        with h5py.File(folder / name) as f:
            assert len(f["ids"]) == len(f["mean"]) > 0

    again = protperf([*args, "-o", out], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed {len(written)} of {total} shards" in again.stderr
    assert_same_file(tmp_path / "clean.h5", out)
    assert not folder.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_shards_of_a_different_run_are_kept_unless_overwrite(fasta, tmp_path, capsys):
    model = export_random_model(tmp_path / "model")
    out = tmp_path / "out.h5"
    folder = shard_folder(out)
    open_shard_folder(folder, {"layers": [7]}, overwrite=False)
    marker = folder / "shard-000000.h5"
    marker.write_bytes(b"another run's shard")
    args = ["embed", str(fasta), "--model", str(model), "-o", str(out)]
    assert cli.main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"protperf embed: error: {folder}: shards of a run with a different ")
    assert "layers" in error and "pass --overwrite to discard it" in error
    assert marker.read_bytes() == b"another run's shard" and not out.exists()
    assert cli.main([*args, "--overwrite"]) == 0
    assert not folder.exists() and len(h5_contents(out)["ids"]) == 160
