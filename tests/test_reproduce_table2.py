"""benchmarks/reproduce_table2.py --smoke on real proteomes: Table 2 from `protperf evaluate`'s
JSON, the concat comparison, the curves, a rerun that skips the finished runs and one that
resumes an unfinished run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protperf.cli import main as protperf_main

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_table2.py"
RUNS = [f"{mode}-{kernel}" for mode in ("unidirectional", "bidirectional") for kernel in ("exact", "relu", "softmax")]  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_table2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce_table2", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, proteome_dir: Path, script) -> tuple[Path, list[str]]:
    """One --smoke invocation (S. elongatus + Synechocystis, E. coli held out as OOD)."""
    out = tmp_path_factory.mktemp("table2") / "out"
    argv = ["--smoke", "--out", str(out), "--proteomes-dir", str(proteome_dir)]
    assert script.main(argv) == 0
    return out, argv


def _table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(("| UNI", "| BID"))
    ]


def test_smoke_writes_table2_from_the_evaluate_json(smoke, script):
    out, _ = smoke
    text = (out / "table2.md").read_text()
    rows = _table_rows(text)
    baselines = [row for row in rows if row[2] == "empirical unigram baseline"]
    assert [(row[0], row[1]) for row in baselines] == [
        ("UNI", "test"), ("UNI", "OOD"), ("BID", "test"), ("BID", "OOD"),
    ]  # fmt: skip
    models = [row for row in rows if row[2] != "empirical unigram baseline"]
    assert len(models) == 12  # 6 runs x (test, OOD)
    for name in RUNS:
        mode, kernel = name.split("-")
        evaluation = json.loads((out / "runs" / name / "evaluate.json").read_text())["result"]
        assert evaluation["kernel"] == kernel and evaluation["mode"] == mode
        for split, set_name in (("test", "test"), ("ood", "OOD")):
            row = next(
                r for r in models
                if (r[0], r[1], r[2]) == (script.MODES[mode], set_name, script.MODELS[kernel])
            )  # fmt: skip
            scores = evaluation["splits"][split]["model"]
            assert row[3] == f"{100 * scores['accuracy']:.2f}"
            assert row[4] == f"{scores['perplexity']:.2f}"
            baseline = next(r for r in baselines if (r[0], r[1]) == (row[0], row[1]))
            expected = evaluation["splits"][split]["baseline"]
            assert baseline[3:5] == [
                f"{100 * expected['accuracy']:.2f}",
                f"{expected['perplexity']:.2f}",
            ]
    assert "Concat setting, unidirectional, L = 256" in text
    # The Performer trains twice the Transformer's steps (constant lr: its curve up to the
    # Transformer's half time does not depend on that).
    assert "| Transformer | 6 |" in text and "| Performer (generalized) | 12 |" in text
    assert "concat: Performer (generalized)" in text
    assert text.count("PASS: ") + text.count("FAIL: ") == 6 + 4 + 1
    assert "Machine: " in text and " cores, torch " in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {*RUNS, "concat-exact", "concat-relu"}
    assert results["concat"]["time_source"] == [
        "`time/train_seconds` logged at each validation (training steps only)"
    ]
    assert len(results["table2"]) == 16


def test_table2_numbers_equal_a_fresh_evaluate(smoke, capsys, single_torch_thread):
    """The table's numbers are what a user gets from `protperf evaluate` on the run."""
    out, _ = smoke
    capsys.readouterr()
    run = out / "runs" / "bidirectional-relu"
    argv = ["evaluate", "--model", str(run), "--data", str(out / "data"), "--format", "json"]
    assert protperf_main(argv) == 0
    fresh = json.loads(capsys.readouterr().out)
    rows = _table_rows((out / "table2.md").read_text())
    row = next(r for r in rows if r[:3] == ["BID", "OOD", "Performer (generalized)"])
    assert row[3] == f"{100 * fresh['splits']['ood']['model']['accuracy']:.2f}"
    assert row[4] == f"{fresh['splits']['ood']['model']['perplexity']:.2f}"


def test_rerun_skips_finished_runs(smoke, script, capsys):
    out, argv = smoke
    before = _table_rows((out / "table2.md").read_text())
    capsys.readouterr()
    started = time.perf_counter()
    assert script.main(argv) == 0
    elapsed = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "reusing" in printed and "$ protperf" not in printed  # nothing prepared or trained
    assert printed.count("skip ") == 8
    assert _table_rows((out / "table2.md").read_text()) == before
    assert elapsed < 30, elapsed  # plotting only


def test_concat_runs_differ_only_in_kernel_and_steps(script, tmp_path):
    args = script.parse_args(["--out", str(tmp_path)])
    exact = script.concat_train_argv(args, tmp_path / "data", "exact")
    relu = script.concat_train_argv(args, tmp_path / "data", "relu")
    for argv in (exact, relu):
        assert "--model.local_conv=4" in argv and "--optim.schedule=constant" in argv
        assert "--model.max_length=8192" in argv and "--concat" in argv
    assert "--trainer.max_steps=600" in exact and "--trainer.max_steps=1200" in relu
    only_exact = [str(a) for a in exact if a not in relu]
    only_relu = [str(a) for a in relu if a not in exact]
    assert only_exact == [
        str(tmp_path / "runs" / "concat-exact"),
        "exact",
        "--trainer.max_steps=600",
    ]
    assert only_relu == [
        str(tmp_path / "runs" / "concat-relu"),
        "relu",
        "--trainer.max_steps=1200",
        "--model.chunk_size=32",  # the Performer's block length; exact attention has none
    ]
    single = script.single_train_argv(args, tmp_path / "data", "unidirectional", "exact")
    assert not any("local_conv" in str(a) for a in single)  # the paper's architecture
    # FAVOR+ softmax keeps its initial features by default; the other kernels have none to redraw
    assert not any("redraw" in str(a) for a in single)
    softmax = script.single_train_argv(args, tmp_path / "data", "bidirectional", "softmax")
    assert "--redraw_until=1" in [str(a) for a in softmax]
    assert script.parse_args(["--out", str(tmp_path), "--modes"]).modes == []


def test_time_to_reach_interpolates_over_time(script):
    timeline = [(9, 10.0, 0.10), (19, 20.0, 0.20), (29, 40.0, 0.30)]
    assert script.time_to_reach(timeline, 0.05) == 10.0  # already there at the first point
    assert script.time_to_reach(timeline, 0.25) == pytest.approx(30.0)
    assert script.time_to_reach(timeline, 0.30) == pytest.approx(40.0)
    assert script.time_to_reach(timeline, 0.31) is None


def test_rerun_resumes_an_unfinished_run(smoke, script, capsys):
    """A run killed after its last checkpoint (no export, no record yet) resumes from it."""
    out, argv = smoke
    run_dir = out / "runs" / "unidirectional-relu"
    trained = load_file(run_dir / "export" / "model.safetensors")
    first_wall = json.loads((run_dir / script.RECORD).read_text())["wall_s"]
    shutil.rmtree(run_dir / "export")
    (run_dir / script.RECORD).unlink()
    capsys.readouterr()
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "unidirectional-relu holds an unfinished run: resuming it" in printed
    assert "starting it over" not in printed
    assert printed.count("skip ") == 7 and printed.count(" --resume") == 1
    resumed = load_file(run_dir / "export" / "model.safetensors")
    assert resumed.keys() == trained.keys()
    for name, tensor in trained.items():  # nothing retrained: the checkpoint was the last step
        assert torch.equal(resumed[name], tensor), name
    record = json.loads((run_dir / script.RECORD).read_text())
    assert record["resumed"] is True
    # The first attempt's time up to its last checkpoint, plus the resumed part.
    assert 0.5 * first_wall < record["wall_s"]


def test_data_with_other_options_needs_force(script, proteome_dir, tmp_path):
    """OUT/data made with other options is refused, and prepared again with --force."""
    out = tmp_path / "out"
    common = ["--smoke", "--out", str(out), "--proteomes-dir", str(proteome_dir)]
    runner = script.Runner("in-process")
    _, first = script.prepare(script.parse_args([*common, "--max-sequences", "300"]), runner)
    assert first["max_sequences"] == 300
    other = script.parse_args([*common, "--max-sequences", "200"])
    with pytest.raises(SystemExit, match="prepared with other options"):
        script.prepare(other, runner)
    other.force = True
    _, second = script.prepare(other, runner)
    assert second["max_sequences"] == 200 and second["records_read"] < first["records_read"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("data")) == ["data"]
