"""Atomic outputs reach the disk before they are renamed into place (fsync, then rename)."""

from __future__ import annotations

import os
from pathlib import Path

from lm_models import tiny_config

from protperf import durable
from protperf.data.build import write_split
from protperf.export import export_model
from protperf.inference import atomic_output
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


def test_atomic_output_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    calls = _record(monkeypatch)
    out = tmp_path / "out.txt"
    with atomic_output(out) as tmp, open(tmp, "w") as handle:
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
