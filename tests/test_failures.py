"""A lost process stops a multi-process run: real 2-process gloo runs of `embed --devices 2` and
`train --trainer.devices 2`, with rank 0 SIGKILLed, rank 1 SIGKILLed or rank 1 frozen (SIGSTOP:
what a lost node or a hung driver looks like from outside) mid-run.

In each case the survivor exits with status 75 and one line naming the lost rank and how to
resume, no traceback, within 90 s of a kill or 180 s of a freeze, and the shards or checkpoints
written before stay. The cases come one after the other in the same folder: each run resumes the
one before it, and the last, uninterrupted, ends with the uninterrupted run's result. The peer
timeout is short here (``PROTPERF_PEER_TIMEOUT``); its default, minutes, is for clusters.
A collective that waits longer than the timeout on a live, busy rank trips nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_data import ecoli_fasta, h5_contents
from lm_models import TINY_TRAIN_ARGS
from safetensors.torch import load_file

from protperf.peers import DEFAULT_PEER_TIMEOUT, PEER_LOST, PEER_TIMEOUT_VARIABLE, peer_timeout

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: The peer timeout of these runs: seconds a frozen rank goes unnoticed.
TIMEOUT = 12
#: What the issue allows a survivor: after a kill, and after a freeze.
KILL_LIMIT, FREEZE_LIMIT = 90, 180
PR_SET_CHILD_SUBREAPER = 36


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            PEER_TIMEOUT_VARIABLE: str(TIMEOUT), "PYTHONWARNINGS": "ignore"}  # fmt: skip


@pytest.fixture
def subreaper():
    """Make this process the parent of orphans: rank 1, started by rank 0, comes back to it
    when rank 0 is killed, so that its exit status can be read."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available")
    yield
    prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


class TwoRanks:
    """A command that starts rank 0, which starts rank 1 (Lightning's launcher), in a process
    group of their own; the test kills only that group."""

    def __init__(self, command: list, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "protperf", *map(str, command)], cwd=cwd, env=environment(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.rank0, self.rank1 = self.process.pid, None

    def wait_for(self, ready, seconds: float = 300) -> int:
        """Wait until ``ready()`` (rank 0 still running); returns rank 1's pid."""
        deadline = time.monotonic() + seconds
        while not ready():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.02)
        (self.rank1,) = children_of(self.rank0)
        return self.rank1

    def survivor_exit(self, victim: str, rank1: int, action: signal.Signals) -> tuple[int, float]:
        """Send ``action`` to ``victim`` (rank0 or rank1); the survivor's exit status and how
        many seconds after the signal it exited."""
        os.kill(self.rank0 if victim == "rank0" else rank1, action)
        sent = time.monotonic()
        limit = FREEZE_LIMIT if action == signal.SIGSTOP else KILL_LIMIT
        if victim == "rank1":
            status = self.process.wait(timeout=limit + 30)
            return status, time.monotonic() - sent
        while time.monotonic() - sent < limit + 30:  # rank 1 is this process's child now
            with contextlib.suppress(ChildProcessError):
                pid, wait_status = os.waitpid(rank1, os.WNOHANG)
                if pid:
                    return os.waitstatus_to_exitcode(wait_status), time.monotonic() - sent
            time.sleep(0.05)
        raise AssertionError(f"rank 1 still running {limit + 30} s after rank 0 was killed")

    def stderr(self) -> str:
        return self.process.communicate(timeout=60)[1]

    def kill(self) -> None:
        """Kill what is left of both ranks, and reap rank 1 if it came back to this process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.rank0, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while self.rank1 is not None and time.monotonic() < deadline:
            try:
                if os.waitpid(self.rank1, os.WNOHANG)[0]:
                    break
            except ChildProcessError:  # reaped by rank 0, or not this process's child yet
                if not Path(f"/proc/{self.rank1}").exists():
                    break
            time.sleep(0.05)


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protperf", *map(str, command)], cwd=cwd,
                          env=environment(), capture_output=True, text=True, timeout=600)  # fmt: skip


def the_error(stderr: str, prog: str) -> str:
    """The one error line of ``stderr``, which has no traceback."""
    assert "Traceback" not in stderr and "frame #" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


#: What happens to the runs, in turn: each later run resumes the one before, then is stopped.
CASES = [("rank1", signal.SIGKILL), ("rank0", signal.SIGKILL), ("rank1", signal.SIGSTOP)]


def lost_words(victim: str, action: signal.Signals) -> str:
    """The start of the survivor's message after ``: error: ``."""
    rank = victim[-1]
    if action == signal.SIGSTOP:
        return f"rank {rank} of 2 gave no sign of life for {TIMEOUT} s"
    return f"rank {rank} of 2 ended"


def stop_midway(command: list, cwd: Path, progress, victim: str, action: signal.Signals) -> str:
    """Run ``command`` (two ranks) until ``progress()`` says it got somewhere, then kill or
    freeze ``victim``; check how the survivor stopped and return its error line."""
    ranks = TwoRanks(command, cwd)
    try:
        rank1 = ranks.wait_for(progress)
        status, seconds = ranks.survivor_exit(victim, rank1, action)
        stderr = ranks.stderr()
    finally:
        ranks.kill()
    print(f"{command[0]}, {victim} {action.name}: the survivor exited after {seconds:.1f} s")
    assert status == PEER_LOST, stderr[-3000:]
    assert seconds < (FREEZE_LIMIT if action == signal.SIGSTOP else KILL_LIMIT)
    line = the_error(stderr, f"protperf {command[0]}")
    assert line.startswith(f"protperf {command[0]}: error: {lost_words(victim, action)}"), line
    return line


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------

EMBED_MODEL = "performer-small-uni"  # the packaged model: slow enough to be stopped midway


def test_embed_stops_when_a_rank_is_lost_and_the_same_command_resumes(
    proteome_dir, tmp_path, subreaper
):
    fasta = tmp_path / "ecoli.fasta"
    ecoli_fasta(proteome_dir, fasta, 160)
    args = ["embed", fasta, "--model", EMBED_MODEL, "--shard-tokens", 3000]
    clean = run([*args, "-o", "clean.h5"], tmp_path)  # one process: the same file, bit for bit
    assert clean.returncode == 0, clean.stderr
    command = [*args, "-o", "out.h5", "--devices", 2]
    shards = tmp_path / "out.h5.shards"
    written: set[str] = set()
    for victim, action in CASES:
        before = set(written)
        line = stop_midway(command, tmp_path, lambda b=before: len(_shards(shards) - b) >= 2,
                           victim, action)  # fmt: skip
        assert line.endswith("the finished shards in out.h5.shards are kept: run the same "
                             "command again to resume"), line  # fmt: skip
        written = _shards(shards)
        assert before < written and not (tmp_path / "out.h5").exists()

    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed {len(written)} of " in again.stderr
    got, want = h5_contents(tmp_path / "out.h5"), h5_contents(tmp_path / "clean.h5")
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clean.h5", "ecoli.fasta", "out.h5"]


def _shards(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("shard-*.h5")}


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

TRAIN_ARGS = [
    *(arg for arg in TINY_TRAIN_ARGS if not arg.startswith("--trainer.devices")),
    "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=20", "--no-test",
    "--loader.batch_size=4",
]  # fmt: skip


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights and last.ckpt's, by name."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {**{f"export/{k}": v for k, v in load_file(run_dir / "export/model.safetensors").items()},
            **{f"ckpt/{k}": v for k, v in checkpoint["state_dict"].items()},
            "ckpt/global_step": torch.tensor(checkpoint["global_step"])}  # fmt: skip


def _last_step(checkpoints: Path) -> int:
    """The step of the newest periodic checkpoint (0 when there is none)."""
    names = [path.stem for path in checkpoints.glob("step*.ckpt")]
    assert all(name[4:].isdigit() for name in names), names  # a step saved again: one name
    return max((int(name[4:]) for name in names), default=0)


def test_train_stops_when_a_rank_is_lost_and_resume_continues(tiny_lm_data, tmp_path, subreaper):
    args = ["train", "--data", tiny_lm_data, *TRAIN_ARGS]
    clean = run([*args, "--run-dir", "clean"], tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    command = [*args, "--run-dir", "run"]
    checkpoints = tmp_path / "run" / "checkpoints"
    for number, (victim, action) in enumerate(CASES):
        step = _last_step(checkpoints)
        resume = ["--resume"] if number else []
        line = stop_midway([*command, *resume], tmp_path,
                           lambda s=step: _last_step(checkpoints) > s, victim, action)  # fmt: skip
        assert line.endswith(f"{Path('run/checkpoints')} keeps the last checkpoint: run the "
                             "command again with --resume"), line  # fmt: skip
        assert _last_step(checkpoints) > step
        for checkpoint in checkpoints.glob("*.ckpt"):
            torch.load(checkpoint, weights_only=True)  # whole

    again = run([*command, "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    got, want = trained(tmp_path / "run"), trained(tmp_path / "clean")
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


# ---------------------------------------------------------------------------------------------
# the watch itself: a slow collective is not a lost rank
# ---------------------------------------------------------------------------------------------

SLOW_WORKER = textwrap.dedent(
    """
    import datetime, sys, time
    import torch.distributed as dist
    from protperf import peers

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    peers.watch_peers(rank=rank, world_size=2, prog="slow", resume="resume")
    if rank == 0:  # busy in Python, as a merge is, for three peer timeouts
        end = time.monotonic() + 3 * peers.peer_timeout()
        while time.monotonic() < end:
            sum(range(1000))
    dist.barrier()  # rank 1 waits here all that time
    dist.barrier()
    peers.leave()
    dist.destroy_process_group()
    print("done", rank)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_collective_slower_than_the_timeout_trips_nothing(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WORKER)
    env = {**environment(), PEER_TIMEOUT_VARIABLE: "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    command = [sys.executable, str(script)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    workers = [
        subprocess.Popen([*command, str(rank)], env=env, text=True, **pipes) for rank in (0, 1)
    ]
    results = []
    for worker in workers:
        try:
            results.append((worker.wait(timeout=120), *worker.communicate()))
        finally:
            worker.kill()
    for rank, (status, stdout, stderr) in enumerate(results):
        assert status == 0 and stdout.split() == ["done", str(rank)], stderr[-3000:]


def test_the_peer_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(PEER_TIMEOUT_VARIABLE, raising=False)
    assert peer_timeout() == DEFAULT_PEER_TIMEOUT == 180
    monkeypatch.setenv(PEER_TIMEOUT_VARIABLE, "12.5")
    assert peer_timeout() == 12.5
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv(PEER_TIMEOUT_VARIABLE, bad)
        with pytest.raises(ValueError, match=f"{PEER_TIMEOUT_VARIABLE}="):
            peer_timeout()
