"""A wheel, installed into a clean environment, runs `protperf embed sequences.fasta` as typed:
the packaged model comes with it, and nothing else (no ./runs, no source tree) is needed."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import h5py
import numpy as np
from lm_data import ecoli_fasta

from protperf import cli
from protperf.pretrained import DEFAULT_PACKAGED

REPO = Path(__file__).resolve().parents[1]


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs
    )
    assert done.returncode == 0, done.stderr
    return done


def test_wheel_in_a_clean_venv_embeds_with_the_packaged_model(proteome_dir, tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp_path / "wheel", REPO])  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("protperf-*.whl")
    packaged = f"protperf/weights/{DEFAULT_PACKAGED}"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for name in ("model.safetensors", "config.json", "tokenizer.json", "MODEL_CARD.md"):
        assert f"{packaged}/{name}" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "-q", wheel])  # fmt: skip
    # The dependencies (torch, Lightning, ...) come from this environment, appended after the
    # venv's own site-packages, so that protperf itself can only come from the wheel. Written
    # after the install, so that pip never sees this environment's editable protperf.
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())  # fmt: skip
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    work.mkdir()
    ids = ecoli_fasta(proteome_dir, work / "sequences.fasta", 4)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = _run([python, "-c", "import protperf; print(protperf.__file__)"], cwd=work)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    done = _run([venv / "bin" / "protperf", "embed", "sequences.fasta"], cwd=work,
                env=environment)  # fmt: skip
    assert f"using the packaged model {DEFAULT_PACKAGED}" in done.stderr
    assert done.stdout.strip() == "sequences.h5"
    assert sorted(path.name for path in work.iterdir()) == ["sequences.fasta", "sequences.h5"]

    # The same numbers as the packaged model of this source tree, run in this process.
    assert cli.main(["embed", str(work / "sequences.fasta"), "--model", DEFAULT_PACKAGED,
                     "-o", str(tmp_path / "here.h5")]) == 0  # fmt: skip
    with h5py.File(work / "sequences.h5") as there, h5py.File(tmp_path / "here.h5") as here:
        assert list(there["ids"].asstr()[:]) == ids
        assert there["mean"].shape == (4, here["mean"].shape[1])
        np.testing.assert_allclose(there["mean"][:], here["mean"][:], rtol=1e-5, atol=1e-5)
