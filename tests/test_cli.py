"""The `protperf` command itself: help, version, unknown verbs, and every verb answering --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from protperf import __version__, cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protperf.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_registered_verb():
    completed = run_cli("--help")
    assert completed.returncode == 0
    assert "usage: protperf" in completed.stdout
    for verb, (_, summary) in cli.VERBS.items():
        assert verb in completed.stdout and summary in completed.stdout


def test_version_and_unknown_verb(capsys):
    assert cli.main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert cli.main(["no-such-verb"]) == 2
    assert "unknown verb 'no-such-verb'" in capsys.readouterr().err
    assert cli.main([]) == 2


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_help(verb):
    completed = run_cli(verb, "--help")
    assert completed.returncode == 0, completed.stderr
    assert "--" in completed.stdout  # lists its options


#: verb -> a prefix of one of its options: argparse would take it for the whole option, so that
#: a typo or a later option sharing the prefix silently changes what runs.
ABBREVIATED = {
    "prepare-data": ["--max-seq", "5"],
    "train": ["--bidir"],
    "plot": ["runs/x", "--ou", "x.png"],
    "embed": ["x.fasta", "--model", "m", "--per-res"],
    "evaluate": ["--model", "m", "--data", "d", "--form", "json"],
    "generate": ["--model", "m", "--temp", "1.0"],
    "score": ["x.fasta", "--model", "m", "--mutation", "m.csv"],
    "probe": ["fit", "x.fasta", "-o", "p", "--te", "y.fasta"],
    "models": ["--ru", "runs"],
    "export": ["runs/x", "out", "--form", "hf"],
}


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_abbreviated_options_are_refused(verb):
    completed = run_cli(verb, *ABBREVIATED[verb])
    assert completed.returncode == 2, completed.stderr
    assert "unrecognized arguments" in completed.stderr
