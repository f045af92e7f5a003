"""The three commands that define protperf, exactly as a user types them, each in the folder
where the previous one ran: prepare-data writes data/2019_01/, train --concat finds it, embed
finds the export train wrote.

The release comes from a UniProt mirror on 127.0.0.1 (named by ``PROTPERF_UNIPROT_MIRROR``, as
an institution's mirror would be). Only the defaults are shrunk for the test: the concat preset
is the paper's 6-layer model at batch 8, which takes minutes and gigabytes on a CPU, and training
stops after two steps; the command lines are exactly the README's.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from lm_data import ecoli_fasta
from uniprot_server import MirrorServer, build_release_tree

from protperf import cli, pretrained, train

DAT_FILES = ["emboss_trembl.dat", "emboss_swissprot_100.dat", "biopython_multi_ex.dat"]
#: The concat preset shrunk: the same keys as train.CONCAT_PRESET, a model that trains in seconds.
TINY_CONCAT = {
    "model": {"depth": 1, "dim": 32, "heads": 4, "ff_dim": 64, "max_length": 8192,
              "num_features": 16},
    "loader": {"batch_size": 2, "num_workers": 0},
}  # fmt: skip
TINY_TRAINER = {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, uniprot_dat_dir) -> Path:
    """A mirror holding release 2019_01 whose TrEMBL is the shared flat files (5 chunks of 8,192)."""
    root = tmp_path_factory.mktemp("mirror")
    trembl = b"".join((uniprot_dat_dir / name).read_bytes() for name in DAT_FILES)
    build_release_tree(root, trembl, release="2019_01")
    return root


@pytest.fixture
def small_defaults(monkeypatch):
    """train's concat preset and trainer defaults shrunk (see the module docstring)."""
    monkeypatch.setattr(train, "CONCAT_PRESET", TINY_CONCAT)
    for key, value in TINY_TRAINER.items():
        monkeypatch.setitem(train.TRAINER_DEFAULTS, key, value)
    train.verb.cache_clear()  # the command line reads the defaults when it is built
    yield
    train.verb.cache_clear()


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_prepare_train_embed_as_typed(
    mirror, proteome_dir, small_defaults, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with MirrorServer(mirror) as server:
        monkeypatch.setenv("PROTPERF_UNIPROT_MIRROR", server.url)
        assert cli.main(["prepare-data", "--release", "2019_01"]) == 0
    assert (tmp_path / "data/2019_01/manifest.json").is_file()
    capsys.readouterr()

    assert cli.main(["train", "--concat"]) == 0
    err = capsys.readouterr().err
    assert "protperf train: --data data/2019_01 (the prepared dataset under data/)" in err
    run = Path("runs/performer-softmax-concat-uni")
    assert (run / "export/model.safetensors").is_file() and (run / "config.yaml").is_file()
    saved = (run / "config.yaml").read_text()
    assert "data: data/2019_01\n" in saved and "concat: true\n" in saved

    ids = ecoli_fasta(proteome_dir, tmp_path / "sequences.fasta", 5)
    assert cli.main(["embed", "sequences.fasta"]) == 0
    captured = capsys.readouterr()
    assert f"using --model {run / 'export'} (the most recent export)" in captured.err
    assert captured.out.strip() == "sequences.h5"
    with h5py.File(tmp_path / "sequences.h5") as f:
        assert list(f["ids"].asstr()[:]) == ids
        assert f["mean"].shape == (5, 32)
        assert f.attrs["model"] == str(run / "export")


def test_train_without_a_dataset_or_with_several_says_so(
    small_defaults, tiny_lm_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--concat"]) == 1
    assert _last_line(capsys) == (
        "protperf train: error: no --data given and no prepared dataset under data/: run "
        "`protperf prepare-data --release 2019_01` first, or pass --data DIR"
    )
    (tmp_path / "data").mkdir()
    for name in ("b", "a"):
        (tmp_path / "data" / name).symlink_to(tiny_lm_data, target_is_directory=True)
    assert cli.main(["train", "--concat"]) == 1
    assert _last_line(capsys) == (
        "protperf train: error: no --data given and 2 prepared datasets under data/ "
        "(data/a, data/b): pass --data DIR"
    )
    assert not (tmp_path / "runs").exists()


def test_embed_without_a_model_says_how_to_get_one(proteome_dir, tmp_path, monkeypatch, capsys):
    """Where no model is packaged either (a source tree without protperf/weights)."""
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path / "no-weights")
    monkeypatch.chdir(tmp_path)
    ecoli_fasta(proteome_dir, tmp_path / "sequences.fasta", 2)
    assert cli.main(["embed", "sequences.fasta"]) == 1
    assert _last_line(capsys) == (
        "protperf embed: error: no --model given and no model exported under runs/: train one "
        "with `protperf train` (it exports to <run>/export), or pass --model PATH"
    )
    assert not (tmp_path / "sequences.h5").exists()
