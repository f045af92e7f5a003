"""Atomic outputs reach the disk before they are renamed into place (fsync, then rename)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lm_models import tiny_config

from protperf import durable
from protperf.data.build import write_split
from protperf.durable import atomic_file
from protperf.errors import InputError
from protperf.export import export_model
from protperf.model import PerformerLM


def _record(monkeypatch) -> list[str]:
    """The path of every fsync, in order."""
    calls: list[str] = []
    real = durable._fsync

    def spy(path: Path) -> None:
        calls.append(str(path))
        real(path)

    monkeypatch.setattr(durable, "_fsync", spy)
    return calls


def test_sync_tree_covers_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    (tmp_path / "a" / "b" / "y.bin").write_bytes(b"2")
    calls = _record(monkeypatch)
    durable.sync_tree(tmp_path / "a")
    synced = {Path(p).relative_to(tmp_path).as_posix() for p in calls}
    assert synced == {"a", "a/b", "a/x.bin", "a/b/y.bin"}


def test_atomic_file_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    calls = _record(monkeypatch)
    out = tmp_path / "out.txt"
    with atomic_file(out) as tmp, open(tmp, "w") as handle:
        handle.write("data")
    assert out.read_text() == "data"
    first, last = calls[0], calls[-1]
    assert first != str(out) and Path(first).parent == tmp_path  # the temporary, before rename
    assert Path(last) == tmp_path.resolve()  # the folder, after rename


def test_export_and_split_files_are_synced_before_publishing(tmp_path, monkeypatch):
    calls = _record(monkeypatch)
    export_model(PerformerLM(tiny_config()), tmp_path / "export", mode="bidirectional")
    staged = [Path(p).name for p in calls]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(staged)
    assert Path(calls[-1]) == tmp_path.resolve()
    calls.clear()
    write_split(tmp_path / "train.h5", ["MKTAYIAK", "MSEQ"], concat_length=8)
    assert calls[0].endswith(".partial") and Path(calls[-1]) == tmp_path.resolve()
    assert os.path.getsize(tmp_path / "train.h5") > 0


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_recover_folder_restores_and_cleans_what_dead_processes_left(tmp_path):
    out = tmp_path / "model"
    dead = _dead_pid()
    older, newer = tmp_path / f".model.{dead}.old", tmp_path / f".model.{dead + 100000}.old"
    for folder, text in ((older, "older"), (newer, "newer")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    os.utime(older, (1, 1))  # the newest moved-aside folder is the one to restore
    partial = tmp_path / f".model.{dead}.partial"
    partial.mkdir()
    live = tmp_path / f".model.{os.getpid()}.partial"  # a live export's staging: left alone
    live.mkdir()

    removed = durable.recover_folder(out)

    assert (out / "config.json").read_text() == "newer"
    assert sorted(removed) == sorted([older, partial])
    assert not older.exists() and not partial.exists() and not newer.exists()
    assert live.is_dir()
    assert durable.recover_folder(out) == []  # nothing left to do; out untouched
    assert (out / "config.json").read_text() == "newer"


_KILLED_BETWEEN_RENAMES = """
import sys, time
from pathlib import Path
from protperf import durable
from protperf.durable import atomic_file
real_rename = Path.rename
def rename(self, target):
    result = real_rename(self, target)
    if str(target).endswith(".old"):  # the earlier export is aside, the new one not yet in place
        print("moved", flush=True)
        time.sleep(60)
    return result
Path.rename = rename
new = Path(sys.argv[1])
new.mkdir()
(new / "config.json").write_text("second")
durable.replace_folder(new, sys.argv[2])
"""


def test_a_publish_killed_between_its_renames_loses_nothing(tmp_path):
    """SIGKILL after the old folder is moved aside and before the new one is renamed in: the
    next run finds the old folder and puts it back (then publishes its own)."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("first")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(tmp_path / "staging"), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "moved"
        assert not out.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    durable.recover_folder(out)
    assert (out / "config.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".old")] == []

    model = PerformerLM(tiny_config())
    export_model(model, out, mode="unidirectional")  # a later export replaces it normally
    assert json.loads((out / "config.json").read_text())["mode"] == "unidirectional"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "staging"]


def test_atomic_file_follows_a_link_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results" / "run1.txt"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.txt"
    link.symlink_to(target)
    with atomic_file(link) as tmp, open(tmp, "w") as handle:
        handle.write("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run1.txt"]


def test_atomic_file_without_overwrite_keeps_a_file_that_appeared(tmp_path):
    out = tmp_path / "out.txt"
    appeared = pytest.raises(InputError, match="appeared while this run was writing it")
    with appeared, atomic_file(out, overwrite=False) as tmp:
        tmp.write_text("new")
        out.write_text("written meanwhile by someone else")
    assert out.read_text() == "written meanwhile by someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = durable.temporary_name(out, int(dead.stdout))
    live = durable.temporary_name(out, os.getpid())
    other = durable.temporary_name(tmp_path / "other.h5", int(dead.stdout))
    for path in (stale, live, other):
        path.write_text("partial")
    assert durable.remove_stale_temporaries(tmp_path, out.name) == [stale]
    assert live.exists() and other.exists()
    assert durable.remove_stale_temporaries(tmp_path) == [other]


def test_output_checks_name_the_option_and_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path, f"-o {tmp_path}: is a folder; give a file name"),
        (Path("/dev/null"), "-o /dev/null: not a regular file (a device or a pipe)"),
        (tmp_path / "file", f"-o {tmp_path / 'file'}: the file exists; pass --overwrite"),
        (tmp_path / "no" / "x", f"-o {tmp_path / 'no' / 'x'}: folder {tmp_path / 'no'} does not"),
    ]
    for out, message in cases:
        with pytest.raises(InputError) as caught:
            durable.check_output_file(out, overwrite=False)
        assert str(caught.value).startswith(message)
    durable.check_output_file(tmp_path / "file", overwrite=True)
    with pytest.raises(InputError, match="exists and is not a folder"):
        durable.check_output_folder(tmp_path / "file", option="--run-dir")
    durable.check_output_folder(tmp_path / "new" / "run", option="--run-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
