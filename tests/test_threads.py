"""``--threads N`` on every verb that computes: it wins over OMP_NUM_THREADS, which wins over
PyTorch's default; several processes of one run on one machine share its cores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from protperf import cli, runtime

REPO = Path(__file__).resolve().parents[1]
COMPUTING = ["train", "embed", "evaluate", "generate", "score"]


@pytest.fixture
def restore_threads(monkeypatch):
    """Put this process's threads and OMP_NUM_THREADS back after the test."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("verb", COMPUTING)
def test_every_verb_that_computes_takes_threads(verb, capsys):
    assert cli.main([verb, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--threads N intra-op threads of this process" in help_text
    assert "OMP_NUM_THREADS when set" in help_text


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_thread_count_is_a_usage_error(value, capsys):
    assert cli.main(["generate", "--threads", value, "-n", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("protperf generate: error: argument --threads: ")
    assert line.endswith("(see protperf generate --help)")


SHOW_THREADS = textwrap.dedent(
    """
    import sys
    from protperf.commandline import run_verb

    def show(size: int = 1) -> None:
        import os, torch
        print(torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))

    sys.exit(run_verb(show, sys.argv[1:], prog="show", threads=True))
    """
)


def _threads(tmp_path: Path, args: list[str], **env: str) -> list[str]:
    script = tmp_path / "show.py"
    script.write_text(SHOW_THREADS)
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environment.update(PYTHONPATH=str(REPO), **env)
    done = subprocess.run([sys.executable, str(script), *args], env=environment,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.split()


def test_the_option_beats_omp_num_threads_which_beats_the_default(tmp_path):
    default = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
        capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    assert _threads(tmp_path, []) == [default, "None"]
    assert _threads(tmp_path, [], OMP_NUM_THREADS="1") == ["1", "1"]
    assert _threads(tmp_path, ["--threads", "2"], OMP_NUM_THREADS="1") == ["2", "2"]
    assert _threads(tmp_path, ["--threads", "1"]) == ["1", "1"]  # launched processes too


def test_processes_on_one_machine_share_its_cores(restore_threads, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    assert runtime.share_cores(1) is None  # one process: PyTorch's default stands
    assert runtime.share_cores(3) == 2
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    assert runtime.share_cores(2) is None  # chosen already (or by --threads): kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.share_cores(16) == 1  # at least one each
