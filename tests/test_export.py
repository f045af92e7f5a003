"""Exports are atomic: a failed export leaves the previous one whole and no staging folder."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from lm_models import export_random_model, tiny_config

from protperf import cli, export, load_model
from protperf.errors import InputError
from protperf.export import export_model
from protperf.model import PerformerLM


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()]


def test_export_round_trips_and_replaces_an_earlier_export(tmp_path):
    out = tmp_path / "export"
    export_random_model(out, seed=0)
    first = load_model(out)
    export_random_model(out, seed=1)
    second = load_model(out)
    torch.manual_seed(1)
    expected = PerformerLM(tiny_config())
    for got, want in zip(_weights(second), _weights(expected), strict=True):
        torch.testing.assert_close(got, want)
    assert any(
        not torch.equal(a, b) for a, b in zip(_weights(first), _weights(second), strict=True)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_random_model(out, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(path):
        path.write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_tokenizer_json", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(PerformerLM(tiny_config()), out, mode="bidirectional")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert json.loads((out / "config.json").read_text())["mode"] == "bidirectional"


def test_a_failed_first_export_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "save_tokenizer_json", lambda path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_model(PerformerLM(tiny_config()), tmp_path / "export", mode="bidirectional")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_exports_are_as_readable_as_any_new_file(tmp_path, umask):
    """safetensors creates its file with mode 0600; an export follows the umask like every other
    file, so another user who can read the folder can load the model."""
    previous = os.umask(umask)
    try:
        export_random_model(tmp_path / "export")
        (tmp_path / "plain").write_text("a file like any other")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in (tmp_path / "export").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


class _Opaque:
    """Not a tensor or a plain value: a checkpoint holding it needs unpickling to load."""


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x80\x02 random bytes" * 20, "not a PyTorch checkpoint (damaged or truncated?)"),
        (None, "the checkpoint holds Python objects other than tensors and plain values"),
        (b"", "not a PyTorch checkpoint (damaged or truncated?)"),
    ],
)
def test_unreadable_checkpoints_are_input_errors_that_never_suggest_unpickling(
    tmp_path, content, problem
):
    path = tmp_path / "model.ckpt"
    if content is None:
        torch.save({"state_dict": {}, "extra": _Opaque()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {problem}")
    assert "weights_only" not in message and "\n" not in message
    assert caught.value.__suppress_context__  # torch's advice stays out of tracebacks too


def test_export_verb_copies_a_run_with_its_metadata(tmp_path, capsys):
    source = export_random_model(tmp_path / "run" / "export", seed=3, causal=True)
    recorded = json.loads((source / "config.json").read_text())
    recorded["metrics"] = {"test/perplexity": 12.5}
    (source / "config.json").write_text(json.dumps(recorded))
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "copy")]) == 0
    assert f"wrote {tmp_path / 'copy'} (protperf, unidirectional" in capsys.readouterr().out
    copied = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert copied["metrics"] == {"test/perplexity": 12.5}
    assert copied["mode"] == "unidirectional"
    for got, want in zip(
        _weights(load_model(tmp_path / "copy")), _weights(load_model(source)), strict=True
    ):
        assert torch.equal(got, want)


def test_export_verb_keeps_an_existing_folder_without_overwrite(tmp_path, capsys):
    source = export_random_model(tmp_path / "a", seed=0)
    existing = export_random_model(tmp_path / "b", seed=1)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    assert cli.main(["export", str(source), str(existing)]) == 1
    message = (
        f"protperf export: error: OUT {existing}: the folder exists; pass --overwrite to replace it"
    )
    assert capsys.readouterr().err.strip() == message
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert cli.main(["export", str(source), str(existing), "--overwrite"]) == 0
    for got, want in zip(_weights(load_model(existing)), _weights(load_model(source)), strict=True):
        assert torch.equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_hf_export_files_are_as_readable_as_any_new_file(tmp_path):
    pytest.importorskip("transformers")
    previous = os.umask(0o022)
    try:
        source = export_random_model(tmp_path / "export", causal=True)
        assert cli.main(["export", str(source), str(tmp_path / "hf"), "--format", "hf"]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert set(modes.values()) == {0o644}
