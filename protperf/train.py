"""``protperf train``: a Performer protein language model on data from ``protperf prepare-data``."""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from protperf import peers, runtime
from protperf.commandline import Fields, Keywords, Verb
from protperf.data.datamodule import LoaderConfig
from protperf.data.publish import DATA_DIR, find_dataset
from protperf.durable import check_output_folder, remove_stale_temporaries, reporting_full_disk
from protperf.errors import InputError
from protperf.lit import OptimConfig
from protperf.model import PerformerConfig
from protperf.objectives import MaskingConfig
from protperf.pretrained import RUNS_DIR
from protperf.runtime import MatmulPrecision
from protperf.workers import close_process_group

#: What ``--concat`` changes in the defaults: the paper's TrEMBL-Concat model and batch.
CONCAT_PRESET: dict[str, dict[str, Any]] = {
    "model": {"depth": 6, "ff_dim": 2048, "max_length": 8192},
    "loader": {"batch_size": 8},
}
#: Trainer settings that differ from Lightning's defaults.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 100_000,
    "gradient_clip_val": 0.5,  # the paper's clip (global norm)
    "val_check_interval": 1000,  # batches, counted across epochs
    "check_val_every_n_epoch": None,
    "limit_val_batches": 100,  # batches per validation run (a subset of a large valid split)
    "log_every_n_steps": 50,
    # The data module shards and seeds its own batches (equal counts per rank, resumable).
    "use_distributed_sampler": False,
}
#: Trainer arguments that ``protperf train`` sets itself.
TRAINER_OWN = frozenset(
    {"logger", "callbacks", "default_root_dir", "enable_checkpointing", "model_registry"}
)
PROG = "protperf train"


@dataclass
class TrainResult:
    trainer: Any  # pl.Trainer
    module: Any  # protperf.lit.ProteinLM
    datamodule: Any  # protperf.data.datamodule.ProteinDataModule
    run_dir: Path


def train(
    data: Path | None = None,
    config: list[Path] | None = None,
    concat: bool = False,
    bidirectional: bool = False,
    seed: int = 0,
    run_dir: Path | None = None,
    resume: bool = False,
    redraw_every: int = 1000,
    redraw_until: int = 0,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    test: bool = True,
    wandb: bool = False,
    wandb_project: str = "protperf",
    tensorboard: bool = False,
    float32_matmul_precision: MatmulPrecision = "high",
    compile: bool = False,
    model: Annotated[PerformerConfig | None, Fields(skip=frozenset({"causal"}))] = None,
    optim: OptimConfig | None = None,
    masking: MaskingConfig | None = None,
    loader: LoaderConfig | None = None,
    trainer: Annotated[
        dict[str, Any] | None,
        Keywords("pytorch_lightning.Trainer", skip=TRAINER_OWN, defaults=TRAINER_DEFAULTS),
    ] = None,
) -> TrainResult:
    """Train a Performer protein language model (causal, or masked with --bidirectional).

    Defaults are the paper's: the 36-layer model (8 heads, d 512, d_ff 1024, L 1,024),
    Adam(0.9, 0.98, eps 1e-9) at lr 1e-3 with decoupled weight decay 0.1, gradient clipping 0.5,
    dropout 0.1. --concat trains on the concat chunks with the paper's concat model (6 layers,
    d_ff 2048, L 8,192, 8 chunks a batch). Every setting can come from YAML files (--config,
    several allowed, later ones win) or the command line (--model.depth 6, --trainer.devices 4),
    the command line winning. Scale out with Lightning's options: --trainer.devices,
    --trainer.num_nodes, --trainer.strategy ddp|fsdp, --trainer.precision bf16-mixed.

    The run folder receives config.yaml (the resolved settings: --config it with --resume to
    continue), logs/version_N/metrics.csv, checkpoints/ (periodic, last.ckpt, best.ckpt by
    validation perplexity), export/ (model.safetensors, config.json, tokenizer.json) and
    curves.png. Example: protperf train --concat

    Args:
        data: a folder written by `protperf prepare-data` (default: the one prepared dataset
            under ./data).
        config: YAML files of settings, read in order before the command line.
        concat: train on the concat chunks, with the paper's concat model as the default.
        bidirectional: train the masked LM (15% of residues, 80/10/10) instead of the causal one.
        seed: seed of the data order, crops, masks, initial weights and dropout.
        run_dir: the run folder (default runs/<config>-<uni|bi>).
        resume: continue the run in --run-dir from its checkpoints/last.ckpt.
        redraw_every: steps between redraws of the random features; 0 never.
        redraw_until: no redraw from this step on, so the last steps train on the draw kept for
            evaluation; 0 redraws to the end.
        checkpoint_every: steps between checkpoints.
        keep_checkpoints: periodic checkpoints kept; -1 all.
        test: test on the test and ood splits at the end.
        wandb: log to Weights & Biases too (offline, into the run folder, without an API key).
        wandb_project: the W&B project.
        tensorboard: log to TensorBoard too.
        float32_matmul_precision: float32 products: high = TF32 on CUDA (FAVOR+ computes in
            float32 even under bf16-mixed), IEEE on CPUs; medium = bfloat16 products on CPUs
            with AMX too; highest = IEEE everywhere.
        compile: torch.compile the model in place (checkpoints and exports unchanged); the first
            steps compile, later ones run elementwise work fused, in fewer kernels.
        model: the architecture (PerformerConfig).
        optim: the optimiser and learning-rate schedule.
        masking: the masked-LM corruption (with --bidirectional).
        loader: batching and loading.
        trainer: Lightning Trainer settings.
    """
    arguments = dict(locals())  # the parameters alone, for the saved settings
    import pytorch_lightning as pl

    from protperf.data.datamodule import ProteinDataModule
    from protperf.lit import BidirectionalLM, UnidirectionalLM, WatchPeers

    model = model or PerformerConfig(**_preset("model", concat))
    optim, masking = optim or OptimConfig(), masking or MaskingConfig()
    loader = loader or LoaderConfig(**_preset("loader", concat))
    trainer_kwargs = {**TRAINER_DEFAULTS, **(trainer or {})}
    if data is None:
        data = find_dataset()
        print(f"{PROG}: --data {data} (the prepared dataset under {DATA_DIR}/)", file=sys.stderr)
    data = Path(data)
    run_dir = (
        Path(run_dir)
        if run_dir is not None
        else default_run_dir(config, model, concat, bidirectional)
    )
    check_output_folder(run_dir, option="--run-dir")
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists() and not resume:
        raise InputError(
            f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir"
        )
    ckpt_path = str(last) if resume and last.exists() else None
    if resume and ckpt_path is None:
        print(f"{PROG}: no checkpoint in {run_dir}, starting from scratch", file=sys.stderr)
    if ckpt_path is not None and not zipfile.is_zipfile(last):  # before anything is written
        raise InputError(f"{last}: not a PyTorch checkpoint (damaged or truncated?)")

    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = ProteinDataModule(
        data, concat=concat, max_length=model.max_length, loader=loader, seed=seed
    )
    try:  # before anything is written: a wrong --data leaves no run folder behind
        datamodule.check()
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"--data: {error}") from error
    lm_settings = {"redraw_every": redraw_every, "redraw_until": redraw_until, "seed": seed}
    try:
        if bidirectional:
            module = BidirectionalLM(model, optim, masking, **lm_settings)
        else:
            module = UnidirectionalLM(model, optim, **lm_settings)
    except ValueError as error:
        raise InputError(f"invalid setting: {error}") from error
    if compile:
        module.model.compile()  # in place: the state dict keeps its keys

    has_validation = datamodule.eval_dataloader("valid") is not None
    if not has_validation:
        trainer_kwargs["limit_val_batches"] = 0
    callbacks = build_callbacks(
        run_dir, checkpoint_every, keep_checkpoints, has_validation=has_validation
    )
    resume_hint = f"{last.parent} keeps the last checkpoint: run the command again with --resume"
    callbacks.append(WatchPeers(prog=PROG, resume=resume_hint))
    loggers = build_loggers(
        run_dir, wandb=wandb, wandb_project=wandb_project, tensorboard=tensorboard
    )
    lightning = _build_trainer(trainer_kwargs, run_dir, loggers, callbacks)
    try:
        datamodule.check_batches(lightning.world_size)
    except ValueError as error:
        raise InputError(f"--data: {error}") from error
    if lightning.world_size > 1:  # before the launcher starts the others: they inherit it
        runtime.share_cores(lightning.num_devices)
    # With its run_dir and data filled in, the saved settings resume the run.
    arguments.update(
        data=data, run_dir=run_dir, resume=False, model=model, optim=optim, masking=masking,
        loader=loader, trainer=trainer_kwargs,
    )  # fmt: skip
    full = f"the checkpoints already in {last.parent} are kept: free some space, then --resume"
    with reporting_full_disk(run_dir, then=full):
        _fit(lightning, module, datamodule, run_dir, arguments, ckpt_path=ckpt_path, test=test,
             float32_matmul_precision=float32_matmul_precision)  # fmt: skip
    return TrainResult(lightning, module, datamodule, run_dir)


def _fit(
    lightning: Any,
    module: Any,
    datamodule: Any,
    run_dir: Path,
    arguments: dict[str, Any],
    *,
    ckpt_path: str | None,
    test: bool,
    float32_matmul_precision: MatmulPrecision,
) -> None:
    """Write the settings, fit, test, export and plot (rank 0 writes)."""
    from protperf.export import TESTED_SPLITS, export_model, model_from_state_dict
    from protperf.plot import plot_run

    last = run_dir / "checkpoints" / "last.ckpt"
    data, concat = arguments["data"], arguments["concat"]
    if lightning.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(last.parent)  # checkpoints a killed launch left half-written
        (run_dir / "config.yaml").write_text(verb().dump(verb().settings_of(arguments)))

    try:
        with runtime.float32_matmul_precision(float32_matmul_precision):
            lightning.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            if test and datamodule.test_dataloader():
                lightning.test(module, datamodule=datamodule, verbose=lightning.is_global_zero)
    except Exception as error:  # a collective that failed because a process was lost
        peers.await_verdict(error)
        raise
    # Gathered on every rank (FSDP shards the weights), written by rank 0.
    state_dict = lightning.strategy.lightning_module_state_dict()
    if lightning.is_global_zero:
        export_model(
            model_from_state_dict(module.config, state_dict),
            run_dir / "export",
            mode=module.mode,
            metadata={
                "step": lightning.global_step,
                "data": str(data),
                "concat": concat,
                "metrics": {
                    name: float(value)
                    for name, value in lightning.callback_metrics.items()
                    if name.startswith(TESTED_SPLITS)
                },
            },
        )
        try:
            plot_run(run_dir)
        except FileNotFoundError:  # nothing logged yet (fewer steps than log_every_n_steps)
            print(f"{PROG}: no metrics to plot in {run_dir}", file=sys.stderr)


def _preset(group: str, concat: bool) -> dict[str, Any]:
    return dict(CONCAT_PRESET.get(group, {})) if concat else {}


def _concat_preset(settings: dict[str, Any]) -> dict[str, Any]:
    return CONCAT_PRESET if settings.get("concat") else {}


def default_run_dir(
    config: list[Path] | None, model: PerformerConfig, concat: bool, bidirectional: bool
) -> Path:
    """runs/<last config's name, or performer-<kernel>[-concat]>-<uni|bi>."""
    mode = "bi" if bidirectional else "uni"
    if config:
        stem = Path(config[-1]).stem
    else:
        stem = f"performer-{model.kernel}" + ("-concat" if concat else "")
    return RUNS_DIR / (stem if stem.endswith(f"-{mode}") else f"{stem}-{mode}")


def _build_trainer(kwargs: dict[str, Any], run_dir: Path, loggers: list, callbacks: list) -> Any:
    import pytorch_lightning as pl
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from protperf.checkpoint_io import DurableCheckpointIO

    kwargs = dict(kwargs)
    plugins = kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(DurableCheckpointIO())  # checkpoints written whole, or not at all
    try:
        return pl.Trainer(
            **kwargs,
            default_root_dir=str(run_dir),
            logger=loggers,
            callbacks=callbacks,
            plugins=plugins,
        )
    except (MisconfigurationException, TypeError, ValueError) as error:
        raise InputError(f"invalid trainer setting: {error}") from error


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_loggers(
    run_dir: Path,
    *,
    wandb: bool = False,
    wandb_project: str = "protperf",
    tensorboard: bool = False,
) -> list[Any]:
    """CSV always (logs/version_N), wandb when asked (offline without credentials), TensorBoard."""
    from pytorch_lightning.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if wandb:
        from pytorch_lightning.loggers import WandbLogger

        offline = not _has_wandb_credentials() or os.environ.get("WANDB_MODE") in (
            "offline",
            "disabled",
        )
        extra = {"mode": "offline"} if offline else {}  # never prompts for a login
        loggers.append(
            WandbLogger(
                project=wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=offline,
                **extra,
            )
        )
    if tensorboard:
        from pytorch_lightning.loggers import TensorBoardLogger

        try:
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard"))
        except ModuleNotFoundError as error:
            raise InputError(f"--tensorboard needs `pip install tensorboard` ({error})") from error
    return loggers


def build_callbacks(
    run_dir: Path, checkpoint_every: int, keep_checkpoints: int, *, has_validation: bool
) -> list[Any]:
    """Periodic + last checkpoints, best by validation perplexity, learning-rate monitor,
    training clock (``time/train_seconds``)."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    from protperf.lit import TrainingClock

    directory = str(run_dir / "checkpoints")
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=directory,
            filename="step{step:08d}",
            every_n_train_steps=checkpoint_every,
            monitor="step",  # keep the latest ones
            mode="max",
            save_top_k=keep_checkpoints,
            save_last=True,
            auto_insert_metric_name=False,
            # A run resumed from before its last periodic checkpoint saves that step again:
            # the same name (written atomically), not Lightning's step...-v1 beside it.
            enable_version_counter=False,
        ),
        LearningRateMonitor(logging_interval="step"),
        TrainingClock(),
    ]
    if has_validation:
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory,
                filename="best",
                monitor="valid/perplexity",
                mode="min",
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    return callbacks


@cache
def verb() -> Verb:
    """``protperf train``'s command line (built once: it reads Lightning's Trainer signature)."""
    return Verb(train, prog=PROG, preset=_concat_preset, threads=True)


def parse(argv: list[str]) -> dict[str, Any]:
    """:func:`train`'s keyword arguments for a command line (YAML files read, preset applied)."""
    settings, _ = verb().resolve(argv)
    return verb().arguments(settings)


def main(argv: list[str]) -> int:
    """``protperf train``: parse ``argv`` and train; returns the exit status."""
    # Intended: the LightningModule prepares (shifts / masks) the data module's batches.
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")
    # The data module, not the DataLoader, saves and restores the position in the epoch.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    status = verb().run(argv)
    if status == 0:
        close_process_group()
    return status


__all__ = ["CONCAT_PRESET", "TRAINER_DEFAULTS", "TrainResult", "main", "train"]
