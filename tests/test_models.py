"""`protperf models`: the packaged models and the exports of local runs, as a table."""

from __future__ import annotations

import os

from lm_models import export_random_model

import protperf
from protperf import cli, pretrained
from protperf.models import list_models


def test_models_lists_packaged_then_runs_newest_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.startswith("no packaged models and no exports under runs/")

    export_random_model(tmp_path / "weights" / "tiny-packaged", seed=1, kernel="relu", causal=True)
    old = export_random_model(tmp_path / "runs" / "old" / "export", kernel="exact")
    new = export_random_model(tmp_path / "runs" / "new" / "export", kernel="softmax", causal=True)
    os.utime(old / "model.safetensors", (1_000_000, 1_000_000))
    metrics = tmp_path / "runs" / "new" / "logs" / "version_0"
    metrics.mkdir(parents=True)
    (metrics / "metrics.csv").write_text("step,test/perplexity\n8,17.25\n12,16.5\n")

    found = list_models(tmp_path / "runs")
    assert [(m.name, m.source) for m in found] == [
        ("tiny-packaged", "packaged"), (str(tmp_path / "runs/new"), "run"),
        (str(tmp_path / "runs/old"), "run"),
    ]  # fmt: skip
    packaged, newest, oldest = found
    assert (packaged.mode, packaged.kernel, packaged.shape) == (
        "unidirectional", "Performer (generalized)", "2 x 32",
    )  # fmt: skip
    assert (newest.kernel, newest.test_perplexity) == ("Performer (softmax)", 16.5)
    assert (oldest.mode, oldest.kernel, oldest.test_perplexity) == (
        "bidirectional", "Transformer", None,
    )  # fmt: skip
    # The count is the model's parameters (tied head once), not the random-feature buffers.
    assert newest.parameters == protperf.load_model(new).num_parameters()
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split("|")[1].strip() == "model" and len(out) == 2 + 3
    assert "| tiny-packaged " in out[2] and "| 16.50" in out[3]
