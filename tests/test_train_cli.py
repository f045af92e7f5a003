"""`protperf train` and `protperf plot` end to end on a tiny model and a tiny real dataset."""

from __future__ import annotations

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
import yaml
from lm_data import write_dataset
from lm_models import TINY_TRAIN_ARGS

from protperf import cli, load_model, train
from protperf.plot import read_metrics

TINY_ARGS = TINY_TRAIN_ARGS


@pytest.fixture(scope="module")
def data(tmp_path_factory, proteome_dir):
    fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    return write_dataset(tmp_path_factory.mktemp("lm-data"), fasta, concat_length=128)


def untrained_perplexity(config, data, split: str) -> float:
    """The perplexity on ``split`` of a model of this architecture as initialised, not trained."""
    from protperf.evaluate import evaluate_model
    from protperf.inference import LoadedModel
    from protperf.model import PerformerLM

    torch.manual_seed(0)
    model = PerformerLM(config).eval()
    loaded = LoadedModel(model, config, data, torch.device("cpu"))
    (result,) = evaluate_model(loaded, data, [split], show_progress=False)
    return result.model.perplexity


def test_print_config_and_the_concat_preset(capsys):
    assert train.main(["--concat", "--model.depth=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["concat"] is True
    assert printed["model"]["depth"] == 2  # explicit values beat the preset
    assert printed["model"]["ff_dim"] == 2048 and printed["model"]["max_length"] == 8192
    assert printed["loader"]["batch_size"] == 8
    assert printed["trainer"]["gradient_clip_val"] == 0.5
    assert "causal" not in printed["model"]  # set by --bidirectional, not by hand
    assert train.main(["--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["depth"] == 36 and printed["model"]["ff_dim"] == 1024
    assert printed["optim"] == {
        "lr": 0.001,
        "betas": [0.9, 0.98],
        "eps": 1e-9,
        "weight_decay": 0.1,
        "schedule": "constant",
        "warmup_steps": 0,
        "decay_steps": None,
        "min_lr_ratio": 0.1,
    }


def test_train_writes_logs_checkpoints_export_and_curves(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--data", str(data), "--run-dir", str(run_dir), *TINY_ARGS, "--model.kernel=relu"]
    assert cli.main(["train", *args, "--trainer.max_steps=8"]) == 0
    for name in (
        "config.yaml",
        "curves.png",
        "export/model.safetensors",
        "export/config.json",
        "export/tokenizer.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    series = read_metrics(run_dir)
    for split in ("train", "valid", "test", "ood"):
        for metric in ("accuracy", "perplexity"):
            values = series[f"{split}/{metric}"]
            assert values and all(v > 0 for v in values.values())
    assert sorted(series["valid/perplexity"]) == [3, 7]  # validation every 4 steps
    # Learned something: the test perplexity is well below the untrained model's.
    untrained = untrained_perplexity(load_model(run_dir / "export").config, data, "test")
    assert series["test/perplexity"][8] < 0.9 * untrained
    # The export records what the run was tested at (protperf models shows it).
    recorded = json.loads((run_dir / "export" / "config.json").read_text())["metrics"]
    for name in ("test/perplexity", "ood/accuracy"):
        assert recorded[name] == pytest.approx(series[name][8], rel=1e-6)
    # The resolved config reproduces the run; checkpoints load without unpickling.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["kernel"] == "relu" and saved["trainer"]["max_steps"] == 8
    again = train.parse(["--config", str(run_dir / "config.yaml"), "--resume"])
    assert again["run_dir"] == run_dir and again["resume"] and again["model"].kernel == "relu"
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8 and checkpoint["ProteinDataModule"]["consumed"] == 8
    exported = load_model(run_dir / "export")
    config = exported.config
    from_ckpt = load_model(run_dir / "checkpoints/last.ckpt")
    from_run = load_model(run_dir)
    assert config.causal and config.kernel == "relu"
    for a, b, c in zip(
        exported.state_dict().values(),
        from_ckpt.state_dict().values(),
        from_run.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and torch.equal(a, c)
    meta = json.loads((run_dir / "export/config.json").read_text())
    assert meta["mode"] == "unidirectional" and meta["step"] == 8
    # A second launch into the same run needs --resume.
    assert cli.main(["train", *args, "--trainer.max_steps=8"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (
        f"protperf train: error: {run_dir} already holds a run: pass --resume to continue it, "
        "or another --run-dir"
    )
    # protperf plot
    (run_dir / "curves.png").unlink()
    assert cli.main(["plot", str(run_dir)]) == 0
    assert (run_dir / "curves.png").stat().st_size > 10_000
    with open(next(run_dir.glob("logs/version_*/metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("lr-AdamW/pg1") for row in rows)
    # The training clock: logged with the train rows and at each validation, never decreasing.
    clock = [(int(row["step"]), float(row["time/train_seconds"])) for row in rows
             if row.get("time/train_seconds")]  # fmt: skip
    assert clock and sorted(clock) == clock and clock[-1][1] > 0
    assert any(row.get("valid/perplexity") and row.get("time/train_seconds") for row in rows)


class _Crash(pl.Callback):
    """Kill the run at the start of a step (the checkpoint of the step before is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # like Ctrl-C or a kill: no end-of-training hooks


def _final_state(run_dir):
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)


def test_kill_and_resume_matches_an_uninterrupted_run(data, tmp_path, monkeypatch):
    common = [
        "--data", str(data), *TINY_ARGS, "--bidirectional", "--model.kernel=softmax",
        "--model.dropout=0.1", "--redraw-every=3", "--trainer.max_steps=10", "--no-test",
        "--optim.schedule=cosine", "--optim.warmup_steps=2",
    ]  # fmt: skip
    assert train.main([*common, "--run-dir", str(tmp_path / "straight")]) == 0

    original = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *a, **k: [*original(*a, **k), _Crash(7)])
    try:  # Lightning turns the interrupt into SystemExit, or protperf into status 130
        status = train.main([*common, "--run-dir", str(tmp_path / "killed")])
    except SystemExit as stop:
        status = stop.code
    assert status not in (0, None)
    assert _final_state(tmp_path / "killed")["global_step"] == 6
    monkeypatch.setattr(train, "build_callbacks", original)
    assert train.main([*common, "--run-dir", str(tmp_path / "killed"), "--resume"]) == 0

    straight, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert straight["global_step"] == resumed["global_step"] == 10
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # The curves of both launches are merged: validation at steps 3 and 7 (the latter re-run).
    assert sorted(read_metrics(tmp_path / "killed")["valid/perplexity"]) == [3, 7]
    # The training clock is checkpointed: the resumed launch continues from the killed one's.
    (clock,) = [v for k, v in resumed["callbacks"].items() if k.startswith("TrainingClock")]
    assert clock["seconds"] > 0


def test_concat_mode_trains(data, tmp_path):
    run_dir = tmp_path / "concat"
    args = ["--data", str(data), "--run-dir", str(run_dir), *TINY_ARGS, "--concat"]
    args += [
        "--model.depth=1",
        "--model.ff_dim=64",
        "--model.max_length=128",
        "--loader.batch_size=2",
    ]
    assert train.main([*args, "--trainer.max_steps=3", "--no-test"]) == 0
    config = load_model(run_dir).config
    assert config.max_length == 128 and config.depth == 1 and config.causal
    assert json.loads((run_dir / "export/config.json").read_text())["concat"] is True


def test_wandb_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    arguments = train.parse(["--wandb", "--data", "x"])
    assert arguments["wandb"] and arguments["wandb_project"] == "protperf"
    loggers = train.build_loggers(tmp_path, wandb=True)
    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger", "WandbLogger"]
    assert loggers[1]._wandb_init["mode"] == "offline"


def test_bf16_mixed_precision_trains_on_cpu(data, tmp_path, monkeypatch):
    """bf16-mixed on a CPU (fast on CPUs with AMX): finite losses that fall, float32 weights out.

    FAVOR+ itself runs in float32 under autocast; the linear layers run in bfloat16, and with
    --float32-matmul-precision=medium FAVOR+'s float32 products too, for the run only.
    """
    before = torch.get_float32_matmul_precision()
    calls: list[str] = []
    setter = torch.set_float32_matmul_precision

    def record(precision: str) -> None:
        calls.append(precision)
        setter(precision)

    monkeypatch.setattr(torch, "set_float32_matmul_precision", record)
    run_dir = tmp_path / "bf16"
    args = ["--data", str(data), "--run-dir", str(run_dir), *TINY_ARGS]
    args += ["--trainer.precision=bf16-mixed", "--float32-matmul-precision=medium"]
    assert train.main([*args, "--trainer.max_steps=30", "--no-test"]) == 0
    assert calls == ["medium", before]  # set for the run, restored after it
    assert torch.get_float32_matmul_precision() == before
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"
    assert saved["float32_matmul_precision"] == "medium"
    series = read_metrics(run_dir)
    (name,) = [key for key in series if key.startswith("train/loss")]
    losses = [loss for _, loss in sorted(series[name].items())]
    assert len(losses) >= 2 and all(torch.isfinite(torch.tensor(losses)))
    assert max(losses[-3:]) < losses[0] - 0.1  # it learns (3.37 -> 2.98 when written)
    model = load_model(run_dir)
    weights = list(model.state_dict().values())
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights)


def test_compiled_training_matches_eager_with_redraws(data, tmp_path):
    """--compile trains the same model as eager mode, features redrawn inside the compiled graph
    included (dropout off: compiled and eager dropout draw different masks)."""
    common = [
        "--data", str(data), *TINY_ARGS, "--concat", "--model.depth=1", "--model.max_length=128",
        "--loader.batch_size=2", "--model.dropout=0", "--redraw-every=2",
        "--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--no-test",
    ]  # fmt: skip
    assert train.main([*common, "--run-dir", str(tmp_path / "eager")]) == 0
    assert train.main([*common, "--run-dir", str(tmp_path / "compiled"), "--compile"]) == 0
    saved = yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())
    assert saved["compile"] is True
    eager = load_model(tmp_path / "eager")
    compiled = load_model(tmp_path / "compiled")
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    assert eager_state.keys() == compiled_state.keys()  # no _orig_mod. prefixes in the export
    for key, value in eager_state.items():  # a run without the redraws differs by ~1e-3
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("problem", ["no folder", "no train split", "not hdf5", "no concat chunks"])
def test_bad_data_is_a_one_line_error_and_writes_no_run(problem, proteome_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    extra = []
    if problem == "no train split":
        folder.mkdir()
    elif problem == "not hdf5":
        folder.mkdir()
        (folder / "train.h5").write_text(">not\nHDF5\n")
    elif problem == "no concat chunks":
        # Chunks of 4,096 tokens from 96 short sequences: none fills one.
        fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
        write_dataset(folder, fasta, concat_length=4096, max_residues=20)
        extra = ["--concat", "--model.max_length=4096"]
    run_dir = tmp_path / "run"
    args = ["--data", str(folder), "--run-dir", str(run_dir), *TINY_ARGS, *extra]
    assert cli.main(["train", *args, "--trainer.max_steps=2"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("protperf train: error: --data: ")
    expected = {
        "no folder": f"{folder}: no such folder",
        "no train split": f"{folder / 'train.h5'} not found",
        "not hdf5": f"{folder / 'train.h5'}: not a protperf dataset",
        "no concat chunks": f"{folder / 'train.h5'}: the train split holds no concat chunks",
    }[problem]
    assert expected in message
    assert not run_dir.exists()  # nothing written: no config, no logs


def test_invalid_model_config_is_a_one_line_error(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--data", str(data), "--run-dir", str(run_dir), *TINY_ARGS, "--model.dim=30"]
    assert cli.main(["train", *args]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("protperf train: error: invalid model setting: dim (30)")
    assert not run_dir.exists()
