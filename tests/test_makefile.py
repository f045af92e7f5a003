"""`make demo` and `make test`: the two commands a fresh machine needs.

The Makefile's recipes are checked with ``make -n`` (the install order, the same steps and test
command as .ci/run); scripts/demo.sh runs for real on the shared proteomes with a tiny model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(target: str, venv: Path) -> list[str]:
    done = subprocess.run(
        ["make", "-n", target, f"VENV={venv}", "PYTHON=python3"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.splitlines()


def _index(lines: list[str], pattern: str) -> int:
    for i, line in enumerate(lines):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no line matches {pattern!r} in:\n" + "\n".join(lines))


@pytest.mark.parametrize(
    ("target", "last"),
    [("demo", r"bash scripts/demo\.sh$"), ("test", r"&& python -m pytest -q$")],
)
def test_make_installs_then_runs(target: str, last: str, tmp_path: Path) -> None:
    """On a fresh machine: venv, CPU torch pinned first, protperf editable, then the job."""
    venv = tmp_path / "venv"
    lines = _dry_run(target, venv)
    steps = [
        rf"^python3 -m venv {re.escape(str(venv))}$",
        r"pip install .*torch==\d+\.\d+\.\d+$",
        r"pip install .*-e '\.\[dev",
        last,
    ]
    positions = [_index(lines, step) for step in steps]
    assert positions == sorted(positions), lines
    assert not any(re.search(r"install [^=]*\btorch\s*$", line) for line in lines), lines


def test_make_matches_ci() -> None:
    """The Makefile pins the torch wheel and installs the extras that .ci/run does."""
    ci = (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    torch_ci = re.search(r"pip install .*(torch==[\w.+]+)", ci).group(1)
    assert re.search(rf"^TORCH \?= {re.escape(torch_ci)}$", makefile, re.M)
    extras_ci = re.search(r"-e '\.\[([\w,]+)\]'", ci).group(1)
    assert re.search(rf"^EXTRAS \?= {re.escape(extras_ci)}$", makefile, re.M)


def test_demo_runs_end_to_end(tmp_path: Path, proteome_dir: Path) -> None:
    """scripts/demo.sh, as `make demo` runs it, with a tiny model: every output it announces."""
    from lm_models import TINY_TRAIN_ARGS

    out = tmp_path / "demo"
    tiny = [*TINY_TRAIN_ARGS, "--trainer.max_steps=4"]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DEMO_DIR": str(out),
        "SHARED_DATA": str(proteome_dir.parent),
        "DEMO_TRAIN_ARGS": " ".join(tiny),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("data/manifest.json", "run/curves.png", "run/export/model.safetensors",
                 "eval.md", "embeddings.h5", "generated.fasta", "sample.fasta"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "sample.fasta").read_text().count(">") == 200
    assert (out / "generated.fasta").read_text().count(">") == 5
    table = (out / "eval.md").read_text()
    assert "| UNI  | test |" in table and "| UNI  | OOD  |" in table
    for name in ("curves.png", "embeddings.h5", "eval.md", "generated.fasta"):
        assert name in done.stdout
