"""Shared fixtures: the real protein data in ../shared/data, a tiny prepared dataset and tiny
models trained on it.

A test that needs the real data is skipped, with a message, where it is absent; under
``CI=true`` (what ``.ci/run`` sets) it fails instead, so that CI cannot pass without testing."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

# Tests run offline: Hugging Face libraries never reach for the Hub, whatever a test asks.
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The real data: ../shared/data beside the repository, or wherever PROTPERF_SHARED_DATA points.
SHARED_DATA = Path(os.environ.get("PROTPERF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI=true``, as .ci/run and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _require(path: Path) -> Path:
    """``path``; where it is missing, skip the test, or under CI=true fail it."""
    if not path.exists():
        message = f"real protein data not found at {path} (see ../shared/data/README.md)"
        if in_ci():
            pytest.fail(f"{message}; under CI=true the tests that need it fail", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real UniProt proteomes (FASTA) and flat-file records."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def proteome_dir(shared_data: Path) -> Path:
    """Folder of gzipped UniProt reference proteomes (FASTA)."""
    return _require(shared_data / "proteomes")


@pytest.fixture(scope="session")
def uniprot_dat_dir(shared_data: Path) -> Path:
    """Folder of UniProtKB flat-file records with Pfam cross-references."""
    return _require(shared_data / "uniprot-dat")


@pytest.fixture(scope="session")
def deeploc_dir(shared_data: Path) -> Path:
    """DeepLoc 1.0 (subcellular localisation, 10 classes): its training subset and test set as
    FASTA, the label in the header (../shared/data/deeploc/README.md)."""
    return _require(shared_data / "deeploc")


@contextlib.contextmanager
def _torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_torch_thread():
    """Run a test on one intra-op thread: tiny models gain nothing from more, and on a busy CPU
    threads waiting for each other at every small op make them many times slower."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_lm_data(tmp_path_factory, proteome_dir: Path) -> Path:
    """A tiny prepared dataset of whole E. coli proteins (train/valid/test/ood, concat 128)."""
    from lm_data import write_dataset

    fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    return write_dataset(tmp_path_factory.mktemp("tiny-lm-data"), fasta, concat_length=128)


@pytest.fixture(scope="session")
def trained_tiny_runs(tmp_path_factory, tiny_lm_data: Path) -> dict[str, Path]:
    """`protperf train` run folders of tiny models trained briefly on :func:`tiny_lm_data`:
    ``{"unidirectional": softmax FAVOR+, "bidirectional": generalized (ReLU) FAVOR+}``.
    Each was tested at the end of training (test and ood metrics in its metrics.csv)."""
    from lm_models import TINY_TRAIN_ARGS

    from protperf import train

    root = tmp_path_factory.mktemp("trained-tiny")
    runs = {}
    for mode, extra in (
        ("unidirectional", ["--model.kernel=softmax"]),
        ("bidirectional", ["--bidirectional", "--model.kernel=relu"]),
    ):
        run_dir = root / mode
        args = ["--data", str(tiny_lm_data), "--run-dir", str(run_dir), *TINY_TRAIN_ARGS, *extra]
        args += ["--optim.lr=0.01", "--trainer.max_steps=16", "--trainer.val_check_interval=8"]
        with _torch_threads(1):
            assert train.main(args) == 0
        runs[mode] = run_dir
    return runs


@pytest.fixture
def disk(tmp_path):
    """A fresh 3 MB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here ({done.stderr.strip()})"
        if in_ci():
            pytest.fail(f"{message}; CI runs as root and must", pytrace=False)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
