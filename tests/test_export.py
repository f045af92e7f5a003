"""Exports are atomic: a failed export leaves the previous one whole and no staging folder."""

from __future__ import annotations

import json

import pytest
import torch
from lm_models import export_random_model, tiny_config

from protperf import export, load_model
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
