"""Every verb over a table of bad inputs: one line on stderr naming the file or option and the
problem, exit status 1, no traceback, nothing written, and no model work for what can be checked
before it.

Each case runs in a fresh folder holding a small prepared dataset, models, a FASTA file and an
existing output; after the run that folder must be exactly as before (no file added, removed or
changed).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
from lm_models import export_random_model

from protperf import cli
from protperf.data.build import write_split
from protperf.pretrained import packaged_models

#: Verbs whose first argument is a subcommand, which their messages name (protperf probe fit).
SUBCOMMANDS = {"probe"}
#: Folders no process may create files in, whoever runs the tests (root too).
UNWRITABLE = Path("/proc")


@dataclass(frozen=True)
class Workspace:
    """The inputs of one case (``root`` is also the current folder)."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        return self.root / FILES[name]


#: Name -> path in the workspace of what :func:`build_workspace` writes.
FILES = {
    "data": "data",
    "fasta": "proteins.fasta",
    "causal": "models/causal",
    "masked": "models/masked",
    "existing_h5": "existing.h5",
    "existing_fasta": "existing.fasta",
    "folder": "a-folder",
    "plain_file": "a-file",
    "bad_ckpt": "models/damaged.ckpt",
    "bad_safetensors": "models/damaged",
    "damaged_data": "damaged-data",
    "truncated_data": "truncated-data",
    "binary_yaml": "binary.yaml",
    "list_yaml": "list.yaml",
    "text": "notes.txt",
    "empty_run": "empty-run",
    "damaged_run": "damaged-run",
    "damaged_chunk_data": "damaged-chunk-data",
}


def unwritable_reason() -> str:
    """What the system says when a file is created in :data:`UNWRITABLE`."""
    try:
        os.close(os.open(UNWRITABLE / "protperf-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except OSError as error:
        return error.strerror
    raise AssertionError(f"{UNWRITABLE} took a new file")


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_lm_data: Path) -> Path:
    """The workspace every case starts from (copied per case)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    ws = Workspace(root)
    shutil.copytree(tiny_lm_data, ws.data)
    export_random_model(ws.causal, causal=True)
    export_random_model(ws.masked)
    ws.fasta.write_text(">p1 first\nMKTAYIAKQRQISFVKSHFSRQ\n>p2 second\nMALWMRLLPLL\n")
    ws.existing_h5.write_bytes(b"an earlier result, not HDF5")
    ws.existing_fasta.write_text(">earlier\nMKT\n")
    ws.folder.mkdir()
    ws.plain_file.write_text("not a folder\n")
    ws.bad_ckpt.write_bytes(b"\x80\x03not a checkpoint" * 10)
    shutil.copytree(ws.masked, ws.bad_safetensors)
    (ws.bad_safetensors / "model.safetensors").write_bytes(b"\xff" * 100)
    shutil.copytree(ws.data, ws.damaged_data)
    (ws.damaged_data / "train.h5").write_bytes(b"\x00" * 4096)
    shutil.copytree(ws.data, ws.truncated_data)
    test_h5 = ws.truncated_data / "test.h5"
    test_h5.write_bytes(test_h5.read_bytes()[:3000])
    _damage_a_compressed_chunk(ws.data, ws.damaged_chunk_data)
    ws.binary_yaml.write_bytes(b"\xff\xfe\x00binary")
    ws.list_yaml.write_text("- a\n- b\n")
    ws.text.write_text("hello\n")
    ws.empty_run.mkdir()
    (ws.damaged_run / "checkpoints").mkdir(parents=True)
    (ws.damaged_run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    return root


def _damage_a_compressed_chunk(data: Path, out: Path) -> None:
    """``data`` with a gzip-compressed test.h5 whose first chunk of tokens is damaged: the file
    opens, and the damage shows only when the tokens are read."""
    shutil.copytree(data, out)
    with h5py.File(data / "test.h5") as f:
        sequences = [f["tokens"][a:b] for a, b in itertools.pairwise(f["offsets"][:])]
        concat_length = int(f.attrs["concat_length"])
    test_h5 = out / "test.h5"
    test_h5.unlink()
    write_split(test_h5, sequences, split="test", concat_length=concat_length, compression="gzip")
    with h5py.File(test_h5) as f:
        chunk = f["tokens"].id.get_chunk_info(0)
    damaged = bytearray(test_h5.read_bytes())
    start = chunk.byte_offset + chunk.size // 2
    damaged[start : start + 64] = bytes(byte ^ 0xFF for byte in damaged[start : start + 64])
    test_h5.write_bytes(bytes(damaged))


def terminal_lines(stderr: str) -> list[str]:
    """The lines a terminal shows for ``stderr``: of a line that progress bars redraw with
    carriage returns, what was drawn last; blank lines dropped."""
    shown = (line.split("\r")[-1] for line in stderr.split("\n"))
    return [line for line in shown if line.strip()]


@dataclass(frozen=True)
class Case:
    """``argv(ws)`` fails with ``message(ws)``; ``forbidden`` are ``module.attribute`` names that
    must not be called (the work that a check must come before)."""

    argv: Callable[[Workspace], list]
    message: Callable[[Workspace], str]
    forbidden: tuple[str, ...] = ()


NO_MODEL_WORK = ("protperf.export.read_model",)
NO_READING = ("protperf.prepare.open_source",)
NO_TRAINING = ("protperf.data.datamodule.ProteinDataModule.check",)
OVERWRITE = "the file exists; pass --overwrite to replace it"
FRACTIONS_ABOVE_1 = ["--valid-fraction", 0.6, "--test-fraction", 0.5]
TEST = ["--split", "test"]
RE_PREPARE = "re-run `protperf prepare-data`"


def mutations_file(ws: Workspace) -> Path:
    """Where a `score --mutations` file goes: beside the workspace, which a case may not change."""
    return ws.root.parent / "mutations.csv"


def score_mutations(ws: Workspace, model: Path, text: str) -> list:
    """`score` of the workspace's FASTA with ``model`` and a mutations file holding ``text``."""
    mutations_file(ws).write_text(text)
    return ["score", ws.fasta, "--model", model, "--mutations", mutations_file(ws)]


def probe_fit(
    ws: Workspace, train: str, test: str | None = None, *options, labels: str | None = None
) -> list:
    """`probe fit` of FASTA files holding ``train`` (and ``test``), written beside the workspace,
    with the workspace's masked model; labels in field 2 of the headers, or in a CSV file holding
    ``labels``."""
    argv = ["probe", "fit", probe_file(ws, "train", train), "--model", ws.masked, "-o", "probe"]
    if test is not None:
        argv += ["--test", probe_file(ws, "test", test)]
    if labels is not None:
        return [*argv, "--labels", probe_file(ws, "labels.csv", labels), *options]
    return [*argv, "--label-field", 2, *options]


def probe_file(ws: Workspace, name: str, text: str) -> Path:
    """``name``.fasta (or ``name`` itself, when it has a suffix) beside the workspace, holding
    ``text``."""
    path = ws.root.parent / (name if "." in name else f"{name}.fasta")
    path.write_text(text)
    return path


#: Four proteins of two classes, a and b: enough to fit on (two folds).
TWO_CLASSES = ">t1 a\nMKTAYIAK\n>t2 a\nMKLLVAG\n>t3 b\nMSTNPKPQ\n>t4 b\nMSSHHW\n"
FOLDS_2 = ["--folds", 2]


CASES = {
    # prepare-data: settings checked before any input is opened
    "prepare-valid-fraction-2": Case(
        lambda ws: ["prepare-data", "--source", ws.fasta, "--out", "out", "--valid-fraction", 2],
        lambda ws: "--valid-fraction must be between 0 and 1, not 2.0",
        NO_READING,
    ),
    "prepare-valid-fraction-negative": Case(
        lambda ws: ["prepare-data", "--source", ws.fasta, "--out", "out", "--valid-fraction=-0.1"],
        lambda ws: "--valid-fraction must be between 0 and 1, not -0.1",
        NO_READING,
    ),
    "prepare-fractions-above-1": Case(
        lambda ws: ["prepare-data", "--source", ws.fasta, "--out", "out", *FRACTIONS_ABOVE_1],
        lambda ws: "--valid-fraction 0.6 and --test-fraction 0.5 add up to more than 1",
        NO_READING,
    ),
    "prepare-concat-length-0": Case(
        lambda ws: ["prepare-data", "--source", ws.fasta, "--out", "out", "--concat-length", 0],
        lambda ws: "--concat-length must be at least 1, not 0",
        NO_READING,
    ),
    "prepare-max-sequences-0": Case(
        lambda ws: ["prepare-data", "--source", ws.fasta, "--out", "out", "--max-sequences", 0],
        lambda ws: "--max-sequences must be at least 1, not 0",
        NO_READING,
    ),
    "prepare-not-fasta": Case(
        lambda ws: ["prepare-data", "--source", ws.text, "--out", "out", "--quiet"],
        lambda ws: (
            f"{ws.text}: neither a UniProt flat file (first line 'ID   ...') nor FASTA "
            "('>' header); it starts with b'hello\\n'"
        ),
    ),
    "prepare-existing-dataset": Case(
        lambda ws: ["prepare-data", "--source", ws.fasta, "--out", ws.data],
        lambda ws: (
            f"{ws.data} already holds a prepared dataset (manifest.json); "
            "pass --overwrite to replace it, or choose another --out"
        ),
        NO_READING,
    ),
    # train: the run folder and the settings checked before the data is read
    "train-binary-config": Case(
        lambda ws: ["train", "--config", ws.binary_yaml, "--data", ws.data],
        lambda ws: (
            f"--config {ws.binary_yaml}: not a YAML file ('utf-8' codec can't decode byte 0xff "
            "in position 0: invalid start byte)"
        ),
        NO_TRAINING,
    ),
    "train-config-not-a-mapping": Case(
        lambda ws: ["train", "--config", ws.list_yaml, "--data", ws.data],
        lambda ws: f"--config {ws.list_yaml}: expected a mapping of settings",
        NO_TRAINING,
    ),
    "train-unwritable-run-dir": Case(
        lambda ws: ["train", "--data", ws.data, "--run-dir", UNWRITABLE / "run"],
        lambda ws: (
            f"--run-dir {UNWRITABLE / 'run'}: cannot write in {UNWRITABLE} ({unwritable_reason()})"
        ),
        NO_TRAINING,
    ),
    "train-run-dir-under-a-file": Case(
        lambda ws: ["train", "--data", ws.data, "--run-dir", ws.plain_file / "run"],
        lambda ws: f"--run-dir {ws.plain_file / 'run'}: {ws.plain_file} is not a folder",
        NO_TRAINING,
    ),
    "train-run-dir-is-a-file": Case(
        lambda ws: ["train", "--data", ws.data, "--run-dir", ws.plain_file],
        lambda ws: f"--run-dir {ws.plain_file}: exists and is not a folder",
        NO_TRAINING,
    ),
    "train-damaged-data": Case(
        lambda ws: ["train", "--data", ws.damaged_data, "--run-dir", "run"],
        lambda ws: (
            f"--data: {ws.damaged_data / 'train.h5'}: not a protperf dataset (Unable to "
            f"synchronously open file (file signature not found)); {RE_PREPARE}"
        ),
    ),
    "train-resume-damaged-checkpoint": Case(
        lambda ws: ["train", "--data", ws.data, "--run-dir", ws.damaged_run, "--resume"],
        lambda ws: (
            f"{ws.damaged_run / 'checkpoints' / 'last.ckpt'}: not a PyTorch checkpoint "
            "(damaged or truncated?)"
        ),
        NO_TRAINING,
    ),
    # evaluate: damaged split files
    "evaluate-damaged-train-h5": Case(
        lambda ws: ["evaluate", "--model", ws.causal, "--data", ws.damaged_data],
        lambda ws: (
            f"{ws.damaged_data / 'train.h5'}: not a protperf dataset (Unable to synchronously "
            f"open file (file signature not found)); {RE_PREPARE}"
        ),
        NO_MODEL_WORK,
    ),
    "evaluate-truncated-test-h5": Case(
        lambda ws: ["evaluate", "--model", ws.causal, "--data", ws.truncated_data],
        lambda ws: (
            f"{ws.truncated_data / 'test.h5'}: not a protperf dataset (Unable to synchronously "
            f"open file (truncated file: eof = 3000, sblock->base_addr = 0, stored_eof = "
            f"{(ws.data / 'test.h5').stat().st_size})); {RE_PREPARE}"
        ),
        NO_MODEL_WORK,
    ),
    "evaluate-damaged-chunk": Case(
        lambda ws: ["evaluate", "--model", ws.causal, "--data", ws.damaged_chunk_data, *TEST],
        lambda ws: (
            f"{ws.damaged_chunk_data / 'test.h5'}: cannot read it (Can't synchronously read "
            f"data (filter returned failure during read)); {RE_PREPARE}"
        ),
    ),
    "evaluate-damaged-checkpoint": Case(
        lambda ws: ["evaluate", "--model", ws.bad_ckpt, "--data", ws.data],
        lambda ws: f"--model {ws.bad_ckpt}: not a PyTorch checkpoint (damaged or truncated?)",
    ),
    # embed: the output checked before the model is loaded; damaged models
    "embed-existing-output": Case(
        lambda ws: ["embed", ws.fasta, "--model", ws.masked, "-o", ws.existing_h5],
        lambda ws: f"-o {ws.existing_h5}: {OVERWRITE}",
        NO_MODEL_WORK,
    ),
    "embed-output-is-a-folder": Case(
        lambda ws: ["embed", ws.fasta, "--model", ws.masked, "-o", ws.folder],
        lambda ws: f"-o {ws.folder}: is a folder; give a file name",
        NO_MODEL_WORK,
    ),
    "embed-unwritable-output": Case(
        lambda ws: ["embed", ws.fasta, "--model", ws.masked, "-o", UNWRITABLE / "x.h5"],
        lambda ws: (
            f"-o {UNWRITABLE / 'x.h5'}: cannot write in {UNWRITABLE} ({unwritable_reason()})"
        ),
        NO_MODEL_WORK,
    ),
    "embed-output-folder-missing": Case(
        lambda ws: ["embed", ws.fasta, "--model", ws.masked, "-o", ws.root / "none" / "x.h5"],
        lambda ws: f"-o {ws.root / 'none' / 'x.h5'}: folder {ws.root / 'none'} does not exist",
        NO_MODEL_WORK,
    ),
    "embed-damaged-checkpoint": Case(
        lambda ws: ["embed", ws.fasta, "--model", ws.bad_ckpt, "-o", "out.h5"],
        lambda ws: f"--model {ws.bad_ckpt}: not a PyTorch checkpoint (damaged or truncated?)",
    ),
    "embed-damaged-safetensors": Case(
        lambda ws: ["embed", ws.fasta, "--model", ws.bad_safetensors, "-o", "out.h5"],
        lambda ws: (
            f"--model {ws.bad_safetensors / 'model.safetensors'}: not a readable safetensors "
            "file (Error while deserializing header: header too large)"
        ),
    ),
    "embed-not-fasta": Case(
        lambda ws: ["embed", ws.text, "--model", ws.masked, "-o", "out.h5"],
        lambda ws: f"{ws.text}: not a FASTA file (the first line does not start with '>')",
        NO_MODEL_WORK,
    ),
    # generate: sampling settings and the output checked before the model is loaded
    "generate-temperature-nan": Case(
        lambda ws: ["generate", "--model", ws.causal, "--temperature", "nan", "-o", "g.fasta"],
        lambda ws: "--temperature must be a finite number >= 0, not nan",
        NO_MODEL_WORK,
    ),
    "generate-temperature-inf": Case(
        lambda ws: ["generate", "--model", ws.causal, "--temperature", "inf", "-o", "g.fasta"],
        lambda ws: "--temperature must be a finite number >= 0, not inf",
        NO_MODEL_WORK,
    ),
    "generate-existing-output": Case(
        lambda ws: ["generate", "--model", ws.causal, "-o", ws.existing_fasta],
        lambda ws: f"-o {ws.existing_fasta}: {OVERWRITE}",
        NO_MODEL_WORK,
    ),
    "generate-output-is-a-folder": Case(
        lambda ws: ["generate", "--model", ws.causal, "-o", ws.folder],
        lambda ws: f"-o {ws.folder}: is a folder; give a file name",
        NO_MODEL_WORK,
    ),
    "generate-unwritable-output": Case(
        lambda ws: ["generate", "--model", ws.causal, "-o", UNWRITABLE / "g.fasta"],
        lambda ws: (
            f"-o {UNWRITABLE / 'g.fasta'}: cannot write in {UNWRITABLE} ({unwritable_reason()})"
        ),
        NO_MODEL_WORK,
    ),
    "generate-damaged-checkpoint": Case(
        lambda ws: ["generate", "--model", ws.bad_ckpt, "-o", "g.fasta"],
        lambda ws: f"--model {ws.bad_ckpt}: not a PyTorch checkpoint (damaged or truncated?)",
    ),
    "generate-masked-model": Case(
        lambda ws: ["generate", "--model", ws.masked, "-o", "g.fasta"],
        lambda ws: (
            f"--model {ws.masked} is a bidirectional (masked) model; generate samples from "
            "unidirectional (causal) models only"
        ),
    ),
    # score: the output and every mutation checked before the model is loaded
    "score-existing-output": Case(
        lambda ws: ["score", ws.fasta, "--model", ws.masked, "-o", ws.existing_h5],
        lambda ws: f"-o {ws.existing_h5}: {OVERWRITE}",
        NO_MODEL_WORK,
    ),
    "score-bad-mutation-line": Case(
        lambda ws: score_mutations(ws, ws.masked, "id,mutation\np1,M1A\np1,A2G\n"),
        lambda ws: f"{mutations_file(ws)}, line 3: A2G: residue 2 of 'p1' is K, not A",
        NO_MODEL_WORK,
    ),
    "score-unknown-id": Case(
        lambda ws: score_mutations(ws, ws.causal, "id,mutation\np3,M1A\n"),
        lambda ws: f"{mutations_file(ws)}, line 2: no protein 'p3' in {ws.fasta}",
        NO_MODEL_WORK,
    ),
    # probe: labels, classes and outputs checked before the model is loaded
    "probe-id-without-label": Case(
        lambda ws: probe_fit(
            ws, TWO_CLASSES, None, *FOLDS_2, labels="id,label\nt1,a\nt2,a\nt3,b\n"
        ),
        lambda ws: (
            f"{ws.root.parent / 'train.fasta'}: record 4 ('t4'): no label (its id is not in "
            f"{ws.root.parent / 'labels.csv'})"
        ),
        NO_MODEL_WORK,
    ),
    "probe-label-only-in-test": Case(
        lambda ws: probe_fit(ws, TWO_CLASSES, ">u1 c\nMKTAYIAK\n", *FOLDS_2),
        lambda ws: (
            f"{ws.root.parent / 'test.fasta'}: record 1 ('u1'): label 'c' is not among the "
            "training labels (a, b)"
        ),
        NO_MODEL_WORK,
    ),
    "probe-one-class": Case(
        lambda ws: probe_fit(ws, ">t1 a\nMKTAYIAK\n>t2 a\nMKLLVAG\n", None, *FOLDS_2),
        lambda ws: (
            f"{ws.root.parent / 'train.fasta'}: every protein has the label 'a'; a classifier "
            "needs two classes or more"
        ),
        NO_MODEL_WORK,
    ),
    "probe-empty-file": Case(
        lambda ws: probe_fit(ws, ""),
        lambda ws: f"{ws.root.parent / 'train.fasta'}: no FASTA records (empty file?)",
        NO_MODEL_WORK,
    ),
    "probe-not-a-number": Case(
        lambda ws: probe_fit(ws, TWO_CLASSES, None, "--task", "regression", *FOLDS_2),
        lambda ws: (
            f"{ws.root.parent / 'train.fasta'}: record 1 ('t1'): label 'a' is not a number "
            "(--task regression)"
        ),
        NO_MODEL_WORK,
    ),
    "probe-existing-output": Case(
        lambda ws: probe_fit(ws, TWO_CLASSES, None, *FOLDS_2, "-o", ws.folder),
        lambda ws: f"-o {ws.folder}: the folder exists; pass --overwrite to replace it",
        NO_MODEL_WORK,
    ),
    "probe-predict-not-a-probe": Case(
        lambda ws: ["probe", "predict", ws.folder, ws.fasta, "-o", "p.csv"],
        lambda ws: f"PROBE {ws.folder}: no probe.json (not a folder that probe fit wrote)",
        NO_MODEL_WORK,
    ),
    # export: the output checked before the model is read
    "export-existing-output": Case(
        lambda ws: ["export", ws.causal, ws.folder],
        lambda ws: f"OUT {ws.folder}: the folder exists; pass --overwrite to replace it",
        NO_MODEL_WORK,
    ),
    "export-output-under-a-file": Case(
        lambda ws: ["export", ws.causal, ws.plain_file / "hf", "--format", "hf"],
        lambda ws: f"OUT {ws.plain_file / 'hf'}: {ws.plain_file} is not a folder",
        NO_MODEL_WORK,
    ),
    "export-unknown-model": Case(
        lambda ws: ["export", "no-such-model", "out"],
        lambda ws: (
            "no-such-model: no such file or folder, and not a packaged model "
            f"(packaged: {', '.join(packaged_models()) or 'none'})"
        ),
        NO_MODEL_WORK,
    ),
    # plot
    "plot-no-metrics": Case(
        lambda ws: ["plot", ws.empty_run],
        lambda ws: f"no metrics.csv under {ws.empty_run}",
    ),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> content digest ("" for folders)."""
    return {
        path.relative_to(root).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        )
        for path in sorted(root.rglob("*"))
    }


def _forbid(monkeypatch, name: str) -> None:
    """Make ``module.attribute`` (or ``module.Class.method``) fail the test when called."""
    owner_name, _, attribute = name.rpartition(".")
    try:
        owner = importlib.import_module(owner_name)
    except ModuleNotFoundError:
        module, _, cls = owner_name.rpartition(".")
        owner = getattr(importlib.import_module(module), cls)

    def called(*args, **kwargs):
        raise AssertionError(f"{name} was called: the check must come first")

    monkeypatch.setattr(owner, attribute, called)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(
    name, template, tmp_path, monkeypatch, capsys
):
    case = CASES[name]
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    ws = Workspace(root)
    monkeypatch.chdir(root)
    for forbidden in case.forbidden:
        _forbid(monkeypatch, forbidden)
    before = snapshot(root)
    verb, *args = (str(arg) for arg in case.argv(ws))
    status = cli.main([verb, *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    program = f"protperf {verb} {args[0]}" if verb in SUBCOMMANDS else f"protperf {verb}"
    assert terminal_lines(captured.err) == [f"{program}: error: {case.message(ws)}"]
    assert status == 1
    assert snapshot(root) == before
    assert not list(UNWRITABLE.glob("*protperf*"))
