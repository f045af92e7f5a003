"""benchmarks/reproduce_table2.py and configs/table2: the configs, and the --smoke pipeline on real
proteomes (Table 2 from `protperf evaluate`'s JSON, verdicts that agree with the numbers, the
concat comparison, a rerun that skips finished runs and one that resumes an interrupted run)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from protperf.cli import main as protperf_main
from protperf.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce_table2.py"
CONFIGS = ROOT / "configs" / "table2"
KERNELS = {"transformer": "exact", "performer-generalized": "relu", "performer-softmax": "softmax",
           "reformer": "reformer", "linformer": "linformer"}  # fmt: skip
KERNEL_OPTIONS = ("model.kernel", "model.lsh_bucket_size", "model.lsh_hashes", "model.linformer_k")
#: Linformer has no causal form: no uni-linformer.
SINGLE = [f"{mode}-{model}" for mode in ("uni", "bid") for model in KERNELS
          if (mode, model) != ("uni", "linformer")]  # fmt: skip
CONCAT = ["concat-transformer", "concat-performer-generalized"]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_table2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce_table2", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


# ---------------------------------------------------------------------------------------------
# The configs
# ---------------------------------------------------------------------------------------------


def _resolved(path: Path) -> dict:
    """`protperf train --config PATH --data X --print_config`, parsed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = protperf_main(["train", "--config", str(path), "--data", "X", "--print-config"])
    assert status == 0, path
    return yaml.safe_load(stdout.getvalue())


def _without(config: dict, *keys: str) -> dict:
    """``config`` without the dotted ``keys`` (and without the config file's own path)."""
    config = json.loads(json.dumps(config))
    config.pop("config", None)
    for key in keys:
        group, field = key.split(".")
        config[group].pop(field)
    return config


def test_table2_configs_load_and_differ_only_in_the_kernel():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(SINGLE + CONCAT)
    resolved = {name: _resolved(CONFIGS / f"{name}.yaml") for name in SINGLE + CONCAT}
    for name, config in resolved.items():
        model = name.split("-", 1)[1]
        assert config["model"]["kernel"] == KERNELS[model], name
        assert config["bidirectional"] == name.startswith("bid-"), name
        assert config["concat"] == name.startswith("concat-"), name
    for mode in ("uni", "bid"):
        names = [name for name in SINGLE if name.startswith(mode)]
        first, *others = (_without(resolved[name], *KERNEL_OPTIONS) for name in names)
        assert all(other == first for other in others), mode
    assert resolved["bid-linformer"]["model"]["linformer_k"] == 64  # n / k = 256 / 64 = 4
    transformer, performer = (
        _without(resolved[n], "model.kernel", "trainer.max_steps") for n in CONCAT
    )
    assert transformer == performer


def test_table2_configs_hold_the_reported_settings():
    raw = {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) for name in SINGLE + CONCAT}
    for name, config in raw.items():
        assert (config["model"]["dim"], config["model"]["heads"], config["model"]["ff_dim"]) == (
            128, 4, 256,
        ), name  # fmt: skip
        assert config["seed"] == 0 and config["test"] is False, name
    for name in SINGLE:
        config = raw[name]
        assert config["model"]["depth"] == 3 and config["model"]["num_features"] == 64
        assert config["redraw_until"] == 1  # the softmax Performer keeps its first draw
        if name.startswith("uni-"):
            assert config["model"]["max_length"] == 1024
            assert config["trainer"]["max_steps"] == 15_000
            assert config["loader"]["token_budget"] == 4096
        else:
            assert config["model"]["max_length"] == 256
            assert config["trainer"]["max_steps"] == 1500
    for name in CONCAT:
        model, optim = raw[name]["model"], raw[name]["optim"]
        assert (model["depth"], model["max_length"], model["local_conv"], model["chunk_size"]) == (
            2, 8192, 4, 32,
        )  # fmt: skip
        assert optim["schedule"] == "constant"
    assert [raw[name]["trainer"]["max_steps"] for name in CONCAT] == [600, 1200]


def test_runs_are_selected_by_name_or_glob_in_table_order(script, tmp_path):
    runs = script.select_runs(["concat-*", "uni-*", "uni-transformer"], tmp_path)
    assert [run.name for run in runs] == [*SINGLE[:4], *CONCAT]
    assert [run.run_dir for run in runs] == [tmp_path / run.name for run in runs]
    assert [run.kernel for run in runs] == ["exact", "relu", "softmax", "reformer", "exact", "relu"]
    assert [run.concat for run in runs] == [False] * 4 + [True] * 2
    assert [run.name for run in script.select_runs(["*"], tmp_path)] == SINGLE + CONCAT
    seeded = script.select_runs(["bid-linformer", "uni-transformer"], tmp_path, seeds=[1, 0])
    assert [(run.name, run.seed, run.run_dir.name) for run in seeded] == [
        ("uni-transformer", 0, "uni-transformer"), ("uni-transformer", 1, "uni-transformer-seed1"),
        ("bid-linformer", 0, "bid-linformer"), ("bid-linformer", 1, "bid-linformer-seed1"),
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="no config"):
        script.select_runs(["uni-lstm"], tmp_path)


# ---------------------------------------------------------------------------------------------
# The verdicts and the concat interpolation, on numbers given here
# ---------------------------------------------------------------------------------------------


def _row(model: str, perplexity: float, unigram: float, transformer: float | None) -> dict:
    row = {"type": "UNI", "set": "test", "model": model, "accuracy": 0.1, "perplexity": perplexity}
    row["ppl_vs_unigram"] = perplexity / unigram - 1
    if transformer is not None:
        row["ppl_vs_transformer"] = perplexity / transformer - 1
    return row


def test_verdicts_pass_and_fail_on_the_targets(script):
    unigram, transformer = 18.34, 16.23
    rows = [
        {"type": "UNI", "set": "test", "model": script.BASELINE, "accuracy": 0.09,
         "perplexity": unigram},
        _row("Transformer", transformer, unigram, None),  # -11.5%
        _row("Performer (generalized)", 16.47, unigram, transformer),  # -10.2%, +1.5%
        _row("Performer (softmax)", 16.80, unigram, transformer),  # -8.4%, +3.5%
        {**_row("Performer (softmax)", 99.0, unigram, transformer), "set": "OOD"},  # not a target
    ]  # fmt: skip
    checks = [(check["check"].split(":")[0], check["pass"]) for check in script.table2_checks(rows)]
    assert checks == [
        ("UNI Transformer", True),
        ("UNI Performer (generalized)", True),
        ("UNI Performer (generalized)", True),
        ("UNI Performer (softmax)", False),
        ("UNI Performer (softmax)", False),
    ]


def test_time_to_reach_interpolates_over_time(script):
    timeline = [(9, 10.0, 0.10), (19, 20.0, 0.20), (29, 40.0, 0.30)]
    assert script.time_to_reach(timeline, 0.05) == 10.0  # already there at the first point
    assert script.time_to_reach(timeline, 0.25) == pytest.approx(30.0)
    assert script.time_to_reach(timeline, 0.30) == pytest.approx(40.0)
    assert script.time_to_reach(timeline, 0.31) is None


# ---------------------------------------------------------------------------------------------
# The smoke pipeline on real proteomes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, proteome_dir: Path, script) -> tuple[Path, list[str]]:
    """One --smoke invocation (S. elongatus + Synechocystis, E. coli held out as OOD), with a
    checkpoint every 3 steps passed through to `protperf train`."""
    out = tmp_path_factory.mktemp("table2") / "out"
    argv = ["--smoke", "--out", str(out), "--proteomes-dir", str(proteome_dir)]
    argv.append("--train-arg=--checkpoint_every=3")
    assert script.main(argv) == 0
    return out, argv


def _table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(("| UNI", "| BID"))
    ]


def _verdicts(text: str) -> dict[str, bool]:
    """{verdict text: passed} from table2.md's "- PASS: ..." / "- FAIL: ..." lines."""
    found = re.findall(r"^- (PASS|FAIL): (.+)$", text, flags=re.MULTILINE)
    assert len({line for _, line in found}) == len(found)
    return {line: status == "PASS" for status, line in found}


def test_smoke_table2_is_evaluate_json_and_verdicts_agree(smoke, script):
    out, _ = smoke
    text = (out / "table2.md").read_text()
    rows = {tuple(row[:3]): row[3:] for row in _table_rows(text)}
    assert len(rows) == 2 * (1 + 4) + 2 * (1 + 5)  # (test, OOD) x (unigram + models): UNI, BID
    verdicts = _verdicts(text)
    unigram_verdicts = transformer_verdicts = 0
    for name in SINGLE:
        mode = "UNI" if name.startswith("uni-") else "BID"
        evaluation = json.loads((out / name / "evaluate.json").read_text())
        transformer = json.loads((out / f"{name[:3]}-transformer" / "evaluate.json").read_text())
        model = script.MODELS[evaluation["kernel"]]
        assert evaluation["kernel"] == KERNELS[name.split("-", 1)[1]]
        for split, set_name in (("test", "test"), ("ood", "OOD")):
            scores, baseline = (evaluation["splits"][split][k] for k in ("model", "baseline"))
            seeds, *row = rows[(mode, set_name, model)]
            assert seeds == "1" and row[2] == f"{scores['perplexity']:.2f}"  # one seed: itself
            del row[2]
            assert row[:2] == [f"{100 * scores['accuracy']:.2f}", f"{scores['perplexity']:.2f}"]
            assert rows[(mode, set_name, script.BASELINE)][1:3] == [
                f"{100 * baseline['accuracy']:.2f}",
                f"{baseline['perplexity']:.2f}",
            ]
            vs_unigram = scores["perplexity"] / baseline["perplexity"] - 1
            assert row[2] == f"{100 * vs_unigram:+.1f}%"
            reference = transformer["splits"][split]["model"]["perplexity"]
            vs_transformer = scores["perplexity"] / reference - 1
            assert row[3] == ("" if model == "Transformer" else f"{100 * vs_transformer:+.1f}%")
            clock = read_metrics(out / name)["time/train_seconds"]
            assert float(row[4]) == pytest.approx(clock[max(clock)], rel=0.01)
            if split != "test":
                continue
            # The verdict lines, recomputed from the numbers above.
            line = next(v for v in verdicts if v.startswith(f"{mode} {model}: test ppl {row[1]},"))
            assert verdicts[line] == (vs_unigram <= -0.10)
            unigram_verdicts += 1
            if model.startswith("Performer"):
                prefix = f"{mode} {model}: test ppl {row[3]} vs the Transformer"
                line = next(v for v in verdicts if v.startswith(prefix))
                assert verdicts[line] == (vs_transformer <= 0.03)
                transformer_verdicts += 1
    assert (unigram_verdicts, transformer_verdicts) == (9, 4)
    assert len(verdicts) == 9 + 4 + 1  # and the concat one
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {*SINGLE, *CONCAT}
    assert [check["pass"] for check in results["checks"]] == list(verdicts.values())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_concat_comparison_agrees_with_metrics(smoke, script):
    out, _ = smoke
    text = (out / "table2.md").read_text()
    timelines = []
    for name in CONCAT:
        series = read_metrics(out / name)
        clock = series["time/train_seconds"]
        timelines.append([(s, clock[s], a) for s, a in sorted(series["valid/accuracy"].items())])
    transformer, performer = timelines
    _, final_time, final_accuracy = transformer[-1]
    reach = script.time_to_reach(performer, final_accuracy)
    ratio = None if reach is None else reach / final_time
    row = next(line for line in text.splitlines() if line.startswith("| Transformer | "))
    assert row.split("|")[3].strip() == f"{100 * final_accuracy:.2f}"
    row = next(line for line in text.splitlines() if line.startswith("| Performer (generalized) |"))
    assert row.split("|")[-2].strip() == ("-" if ratio is None else f"{ratio:.2f}x")
    concat = {line: ok for line, ok in _verdicts(text).items() if line.startswith("concat: ")}
    assert list(concat.values()) == [ratio is not None and ratio < 0.5]
    assert f"accuracy {100 * final_accuracy:.2f}%" in next(iter(concat))


def test_table2_evaluation_equals_a_fresh_evaluate(smoke, capsys, single_torch_thread):
    """evaluate.json, the table's source, is what a user gets from `protperf evaluate`."""
    out, _ = smoke
    run = out / "bid-performer-generalized"
    capsys.readouterr()
    argv = ["evaluate", "--model", str(run), "--data", str(out / "data"), "--format", "json"]
    assert protperf_main(argv) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert fresh["splits"] == json.loads((run / "evaluate.json").read_text())["splits"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rerun_skips_finished_runs(smoke, script, capsys):
    out, argv = smoke
    exports = {name: out / name / "export" / "model.safetensors" for name in SINGLE + CONCAT}
    before = {name: (_digest(path), path.stat().st_mtime_ns) for name, path in exports.items()}
    table = _table_rows((out / "table2.md").read_text())
    capsys.readouterr()
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "$ protperf" not in printed  # nothing prepared, trained or evaluated
    assert "reusing" in printed and printed.count("skip ") == 11
    assert {name: (_digest(p), p.stat().st_mtime_ns) for name, p in exports.items()} == before
    assert _table_rows((out / "table2.md").read_text()) == table


def test_rerun_resumes_an_interrupted_run(smoke, script, capsys):
    """A run stopped after its step-3 checkpoint (no export) is continued from it, not restarted:
    the relaunch logs steps 3-5 only and ends with the uninterrupted run's weights."""
    out, argv = smoke
    run_dir = out / "uni-performer-generalized"
    trained = load_file(run_dir / "export" / "model.safetensors")
    shutil.rmtree(run_dir / "export")
    shutil.copy(
        run_dir / "checkpoints" / "step00000003.ckpt", run_dir / "checkpoints" / "last.ckpt"
    )
    capsys.readouterr()
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    commands = [line for line in printed.splitlines() if line.startswith("$ protperf")]
    assert len(commands) == 2  # train --resume, then evaluate, of that run only
    assert commands[0].startswith("$ protperf train --config ") and str(run_dir) in commands[0]
    assert " --resume" in commands[0]
    assert commands[1].startswith(f"$ protperf evaluate --model {run_dir} ")
    assert printed.count("skip ") == 10
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    assert len(versions) == 2
    relaunch = read_metrics(versions[1].parent)["train/loss"]
    assert min(relaunch) == 3 and min(read_metrics(versions[0].parent)["train/loss"]) == 0
    resumed = load_file(run_dir / "export" / "model.safetensors")
    assert resumed.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(resumed[name], tensor), name  # training is deterministic on a CPU


def test_a_second_seed_is_reported_beside_the_first(smoke, script):
    """--seeds 1 trains only the seed-1 runs; the table then gives both seeds' perplexities and
    their mean."""
    out, argv = smoke
    trained = {name: _digest(out / name / "export" / "model.safetensors")
               for name in ("bid-transformer", "bid-linformer")}  # fmt: skip
    assert script.main([*argv, "--runs", *trained, "--seeds", "1"]) == 0
    rows = {tuple(row[:3]): row[3:] for row in _table_rows((out / "table2.md").read_text())}
    for name, digest in trained.items():
        assert _digest(out / name / "export" / "model.safetensors") == digest  # not retrained
        evaluations = [json.loads((out / folder / "evaluate.json").read_text())
                       for folder in (name, f"{name}-seed1")]  # fmt: skip
        ppl = [e["splits"]["test"]["model"]["perplexity"] for e in evaluations]
        assert ppl[0] != ppl[1]  # another seed: other weights
        seeds, _, mean, per_seed, *_ = rows[
            ("BID", "test", script.MODELS[evaluations[0]["kernel"]])
        ]
        assert seeds == "2" and per_seed == f"{ppl[0]:.2f} / {ppl[1]:.2f}"
        assert mean == f"{(ppl[0] + ppl[1]) / 2:.2f}"
