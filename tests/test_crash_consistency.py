"""Crash consistency: real processes killed with SIGKILL at random points while they write.

``prepare-data`` (killed while it writes its HDF5 files or publishes its folder), ``train``
(while it saves a checkpoint or its export) and ``embed`` (while it writes its HDF5 file) each
leave the old complete output or none (for a folder: possibly moved aside, put back by the next
run), and the next run succeeds and equals an uninterrupted one: bit-identical HDF5 files for
prepare-data and embed, identical weights for a resumed train. Two prepare-data runs into one
folder at once: one fails with a clear message, and the folder holds one complete dataset.

The kill points are the calls that write or publish (tests/kill_points.py): each trial picks one
at random, or a random moment of the run. The random choices are seeded by
``PROTPERF_KILL_SEED`` (printed on failure); ``PROTPERF_KILL_TRIALS`` sets the trials per test
(the suite's default keeps the file near a minute; run it with more, or many times, locally).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_data import h5_contents
from lm_models import TINY_TRAIN_ARGS, export_random_model
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
KILLER = TESTS / "kill_points.py"
TRIALS = int(os.environ.get("PROTPERF_KILL_TRIALS") or 2)
SEED = int(os.environ.get("PROTPERF_KILL_SEED") or time.time_ns() % 1_000_000)


@pytest.fixture
def rng(request) -> random.Random:
    """Seeded per test: ``PROTPERF_KILL_SEED=<seed>`` repeats a failing run's choices."""
    return random.Random(f"{SEED}:{request.node.name}")


@dataclass
class Run:
    """A finished child: its exit status (``-SIGKILL`` when killed) and its stderr."""

    status: int
    stderr: str
    points: int | None  # kill points met, when it was not killed


def protperf(
    args: list, cwd: Path, *, kill_at: int = 0, kill_after: float | None = None, **env: str
) -> Run:
    """Run ``protperf ARGS`` in a child; kill it at its ``kill_at``-th kill point, or
    ``kill_after`` seconds after it starts."""
    count = cwd / f".kill-count-{os.getpid()}"
    count.unlink(missing_ok=True)
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PROTPERF_KILL_AT": str(kill_at),
        "PROTPERF_KILL_COUNT": str(count),
        **env,
    }
    command = [sys.executable, "-B", str(KILLER), *map(str, args)]
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    points = int(count.read_text()) if count.exists() else None
    count.unlink(missing_ok=True)
    return Run(process.returncode, stderr, points)


def timed(args: list, cwd: Path, **env: str) -> tuple[Run, float]:
    start = time.perf_counter()
    run = protperf(args, cwd, **env)
    return run, time.perf_counter() - start


def kill_somewhere(args: list, cwd: Path, rng: random.Random, points: int, seconds: float, **env):
    """Kill a run at a random kill point or, one time in four, at a random moment."""
    if rng.random() < 0.25:
        moment = rng.uniform(0, seconds)
        return protperf(args, cwd, kill_after=moment, **env), f"at {moment:.2f} s"
    point = rng.randint(1, points)
    return protperf(args, cwd, kill_at=point, **env), f"at kill point {point} of {points}"


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``: relative path -> bytes."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries, partial and moved-aside folders of protperf in ``folder``."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# prepare-data
# ---------------------------------------------------------------------------------------------


def dataset(folder: Path) -> dict[str, bytes]:
    """A prepared dataset's files, the manifest without its timing."""
    contents = files(folder)
    manifest = json.loads(contents.pop("manifest.json"))
    del manifest["elapsed_seconds"]
    contents["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return contents


@pytest.fixture(scope="module")
def proteomes(proteome_dir: Path) -> list[Path]:
    return [
        proteome_dir / "UP000000625-E.coli.fasta.gz",
        proteome_dir / "UP000002717-S.elongatus.fasta.gz",
    ]


def prepare_args(sources: list[Path], out: str, seed: int) -> list:
    return ["prepare-data", "--source", *sources, "--out", out, "--quiet",
            "--concat-length", 256, "--seed", seed]  # fmt: skip


def test_prepare_data_killed_anywhere_keeps_the_old_dataset(proteomes, tmp_path, rng):
    """A run replacing an earlier dataset (--overwrite), killed at a random point; then run
    again: the folder holds the old dataset or the new one, never a mix, and the re-run's files
    are byte for byte those of a run never killed."""
    assert protperf(prepare_args(proteomes, "old", 1), tmp_path).status == 0
    old = dataset(tmp_path / "old")
    out = tmp_path / "out"
    args = [*prepare_args(proteomes, "out", 0), "--overwrite"]
    shutil.copytree(tmp_path / "old", out)
    reference, seconds = timed(args, tmp_path)  # what a run never killed writes, and its points
    assert reference.status == 0, reference.stderr
    clean = dataset(out)
    assert old != clean  # another seed: another concat order
    for trial in range(TRIALS):
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "old", out)
        killed, where = kill_somewhere(args, tmp_path, rng, reference.points, seconds)
        context = f"seed {SEED}, trial {trial}, killed {where}"
        if killed.status == 0:  # a moment after the end
            assert dataset(out) == clean, context
            continue
        assert killed.status == -signal.SIGKILL, (context, killed.stderr)
        if out.exists():
            assert dataset(out) in (old, clean), context
        else:  # killed between the two renames: the old one waits beside, whole
            (aside,) = tmp_path.glob(".out.*.old")
            assert dataset(aside) == old, context
        again = protperf(args, tmp_path)
        assert again.status == 0, (context, again.stderr)
        assert dataset(out) == clean, context
        assert leftovers(tmp_path) == [], context


def test_prepare_data_killed_in_a_new_folder_leaves_nothing_or_everything(proteomes, tmp_path, rng):
    reference, seconds = timed(prepare_args(proteomes, "clean", 0), tmp_path)
    clean = dataset(tmp_path / "clean")
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        args = prepare_args(proteomes, out.name, 0)
        killed, where = kill_somewhere(args, tmp_path, rng, reference.points, seconds)
        context = f"seed {SEED}, trial {trial}, killed {where}"
        assert killed.status in (0, -signal.SIGKILL), (context, killed.stderr)
        assert not out.exists() or dataset(out) == clean, context
        again = protperf([*args, "--overwrite"], tmp_path)
        assert again.status == 0, (context, again.stderr)
        assert dataset(out) == clean, context
        assert leftovers(tmp_path) == [], context


def test_two_runs_into_one_folder_at_once(proteomes, tmp_path):
    args = prepare_args(proteomes, "out", 0)
    assert protperf(prepare_args(proteomes, "clean", 0), tmp_path).status == 0
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "protperf.cli", *map(str, args)]
    children = [
        subprocess.Popen(command, cwd=tmp_path, env=environment, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(child.wait(timeout=600), child.stderr.read()) for child in children]
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 1], results
    (message,) = (stderr for status, stderr in results if status == 1)
    assert message.strip().splitlines() in (
        ["protperf prepare-data: error: out.partial is locked: another prepare-data run "
         "is writing out"],
        ["protperf prepare-data: error: out already holds a prepared dataset (manifest.json); "
         "pass --overwrite to replace it, or choose another --out"],
    ), message  # fmt: skip
    assert dataset(tmp_path / "out") == dataset(tmp_path / "clean")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

TRAIN_ARGS = [*TINY_TRAIN_ARGS, "--trainer.max_steps=6", "--no-test", "--model.dropout=0.1",
              "--redraw-every=3", "--optim.schedule=cosine", "--optim.warmup_steps=2"]  # fmt: skip
#: Kill points counted only while a checkpoint or the export is being written.
SAVING = {
    "PROTPERF_KILL_WITHIN": "protperf.checkpoint_io:DurableCheckpointIO.save_checkpoint,"
    "protperf.export:export_model",
    "PROTPERF_KILL_DELAY": "0.002",
}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights and those of checkpoints/last.ckpt, by name."""
    exported = load_file(run_dir / "export" / "model.safetensors")
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {**{f"export/{k}": v for k, v in exported.items()},
            **{f"ckpt/{k}": v for k, v in checkpoint["state_dict"].items()},
            "ckpt/global_step": torch.tensor(checkpoint["global_step"])}  # fmt: skip


def test_train_killed_while_saving_resumes_to_the_same_weights(tiny_lm_data, tmp_path, rng):
    """Killed at a random point of writing a checkpoint or the export, a run continued with
    --resume ends with the weights of a run never killed, and every checkpoint it left loads."""
    common = ["train", "--data", tiny_lm_data, *TRAIN_ARGS]
    reference = protperf([*common, "--run-dir", "straight"], tmp_path, **SAVING)
    assert reference.status == 0, reference.stderr
    expected = weights(tmp_path / "straight")
    for trial in range(TRIALS):
        run_dir = tmp_path / f"killed{trial}"
        point = rng.randint(1, reference.points)
        context = f"seed {SEED}, trial {trial}, killed at point {point} of {reference.points}"
        args = [*common, "--run-dir", run_dir.name]
        killed = protperf(args, tmp_path, kill_at=point, **SAVING)
        assert killed.status == -signal.SIGKILL, (context, killed.stderr)
        for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
            torch.load(checkpoint, weights_only=True)  # whole, or absent
        if (run_dir / "export").exists():
            assert set(files(run_dir / "export")) == {
                "model.safetensors", "config.json", "tokenizer.json"
            }, context  # fmt: skip
        resumed = protperf([*args, "--resume"], tmp_path)
        assert resumed.status == 0, (context, resumed.stderr)
        got = weights(run_dir)
        assert got.keys() == expected.keys(), context
        for name, value in expected.items():
            assert torch.equal(got[name], value), (context, name)
        assert leftovers(run_dir) == [] and leftovers(run_dir / "checkpoints") == [], context


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_embed_killed_while_writing_keeps_the_old_file(proteome_dir, tmp_path, rng):
    import gzip

    with gzip.open(proteome_dir / "UP000000625-E.coli.fasta.gz", "rt") as handle:
        text = handle.read()
    (tmp_path / "p.fasta").write_text(">" + ">".join(text.split(">")[1:41]))
    model = export_random_model(tmp_path / "model")

    def embed(out: str) -> list:
        return ["embed", "p.fasta", "--model", model, "-o", out, "--per-residue",
                "--tokens-per-batch", 2048, "--overwrite"]  # fmt: skip

    args = embed("out.h5")
    reference, seconds = timed(embed("clean.h5"), tmp_path)
    assert reference.status == 0, reference.stderr
    clean = h5_contents(tmp_path / "clean.h5")
    out = tmp_path / "out.h5"
    for trial in range(TRIALS):
        had_old = trial % 2 == 0
        out.unlink(missing_ok=True)
        if had_old:
            out.write_bytes(b"an earlier file")
        killed, where = kill_somewhere(args, tmp_path, rng, reference.points, seconds)
        context = f"seed {SEED}, trial {trial}, killed {where}"
        if killed.status != 0:
            assert killed.status == -signal.SIGKILL, (context, killed.stderr)
            if had_old and out.read_bytes() == b"an earlier file":
                pass  # killed before the rename
            else:  # killed after it (or there was no earlier file)
                assert not out.exists() or same(h5_contents(out), clean), context
        again = protperf(args, tmp_path)
        assert again.status == 0, (context, again.stderr)
        assert same(h5_contents(out), clean), context
        assert leftovers(tmp_path) == [], (context, leftovers(tmp_path))
