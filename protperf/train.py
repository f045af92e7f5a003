"""Train a Performer protein language model on data from `protperf prepare-data`.

    protperf train --data DIR [--config FILE] [--concat] [--bidirectional] [--resume] [--FIELD VALUE ...]

Every field below can be set in a YAML file (``--config``, several allowed, later ones win) or on
the command line (``--model.depth 6``, ``--trainer.devices 4``); ``--print_config`` prints the
resolved configuration and exits. Defaults are the paper's: the 36-layer model (8 heads, d 512,
d_ff 1024, L 1,024), Adam(0.9, 0.98, eps 1e-9) at lr 1e-3 with decoupled weight decay 0.1,
gradient clipping 0.5, dropout 0.1. ``--concat`` switches the defaults to the concat dataset and
the paper's concat model (6 layers, d_ff 2048, L 8,192, 8 chunks a batch); ``--bidirectional``
trains the masked LM instead of the causal one. Scale out with Lightning's own flags:
``--trainer.devices``, ``--trainer.num_nodes``, ``--trainer.strategy ddp|fsdp``,
``--trainer.precision bf16-mixed``.

A run directory (``--run_dir``, default ``runs/<config>-<uni|bi>``) receives: config.yaml (the
resolved config), logs/version_N/metrics.csv (one version per launch), checkpoints/ (every
``--checkpoint_every`` steps, the latest ``--keep_checkpoints`` kept, last.ckpt, and best.ckpt by
validation perplexity), export/ (model.safetensors + config.json + tokenizer.json, loadable with
``protperf.export.load_model``) and curves.png. ``--resume`` continues from checkpoints/last.ckpt.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import (
    ActionConfigFile,
    ActionYesNo,
    ArgumentParser,
    Namespace,
    set_parsing_settings,
)

from protperf.commandline import CommandError
from protperf.runtime import MatmulPrecision, float32_matmul_precision

#: What ``--concat`` changes in the defaults: the paper's TrEMBL-Concat model and batch.
CONCAT_PRESET: dict[str, Any] = {
    "model.depth": 6,
    "model.ff_dim": 2048,
    "model.max_length": 8192,
    "loader.batch_size": 8,
}

#: Trainer defaults that differ from Lightning's.
TRAINER_DEFAULTS: dict[str, Any] = {
    "trainer.max_steps": 100_000,
    "trainer.gradient_clip_val": 0.5,  # the paper's clip (global norm)
    "trainer.val_check_interval": 1000,  # batches, counted across epochs
    "trainer.check_val_every_n_epoch": None,
    "trainer.limit_val_batches": 100,  # batches per validation run (a subset of a large valid)
    "trainer.log_every_n_steps": 50,
    # The data module shards and seeds its own batches (equal counts per rank, resumable).
    "trainer.use_distributed_sampler": False,
}


def build_parser(*, concat: bool = False) -> ArgumentParser:
    """The ``protperf train`` parser; ``concat=True`` applies :data:`CONCAT_PRESET` as defaults."""
    import pytorch_lightning as pl

    from protperf.data.datamodule import LoaderConfig
    from protperf.lit import MaskingConfig, OptimConfig
    from protperf.model import PerformerConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings -> --help
    parser = ArgumentParser(
        prog="protperf train", description=__doc__, exit_on_error=True, allow_abbrev=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s)")
    parser.add_argument("--data", type=str | None, default=None, help="prepared dataset folder")
    parser.add_argument(
        "--concat", action=ActionYesNo, default=False, help="concat chunks and model"
    )
    parser.add_argument("--bidirectional", action=ActionYesNo, default=False, help="masked LM")
    parser.add_argument(
        "--seed", type=int, default=0, help="data order, crops, masks, init, dropout"
    )
    parser.add_argument(
        "--run_dir", type=str | None, default=None, help="default runs/<config>-<uni|bi>"
    )
    parser.add_argument(
        "--resume", action=ActionYesNo, default=False, help="continue from last.ckpt"
    )
    parser.add_argument(
        "--redraw_every", type=int, default=1000, help="feature redraw period; 0 never"
    )
    parser.add_argument(
        "--redraw_until",
        type=int,
        default=0,
        help="no redraw from this step on: the last steps train on the draw kept for "
        "evaluation; 0 redraws to the end",
    )
    parser.add_argument(
        "--checkpoint_every", type=int, default=1000, help="steps between checkpoints"
    )
    parser.add_argument(
        "--keep_checkpoints", type=int, default=3, help="periodic ones kept; -1 all"
    )
    parser.add_argument("--test", action=ActionYesNo, default=True, help="test and ood at the end")
    parser.add_argument(
        "--wandb", action=ActionYesNo, default=False, help="log to wandb (offline without key)"
    )
    parser.add_argument("--wandb_project", type=str, default="protperf")
    parser.add_argument(
        "--tensorboard", action=ActionYesNo, default=False, help="TensorBoard logs too"
    )
    parser.add_argument(
        "--float32_matmul_precision",
        type=MatmulPrecision,
        default="high",
        help="torch.set_float32_matmul_precision for the run. high: TF32 tensor cores for "
        "float32 products on CUDA (FAVOR+ keeps float32 under bf16-mixed), IEEE float32 on "
        "CPUs; medium: also bfloat16 products on CPUs with AMX; highest: IEEE everywhere",
    )
    parser.add_argument(
        "--compile",
        action=ActionYesNo,
        default=False,
        help="torch.compile the model in place (checkpoints and exports unchanged). The first "
        "steps compile (seconds to a minute), then elementwise work runs fused, in fewer "
        "kernels: on a 2-core CPU the concat shape's 8k step ran 4-15 (causal) and 6-12 "
        "(bidirectional) percent faster",
    )
    parser.add_class_arguments(PerformerConfig, "model", skip={"causal"})
    parser.add_class_arguments(OptimConfig, "optim")
    parser.add_class_arguments(MaskingConfig, "masking")
    parser.add_class_arguments(LoaderConfig, "loader")
    parser.add_class_arguments(
        pl.Trainer,
        "trainer",
        skip={"logger", "default_root_dir", "enable_checkpointing"},
        instantiate=False,
    )
    parser.set_defaults(TRAINER_DEFAULTS)
    if concat:
        parser.set_defaults(CONCAT_PRESET)
    return parser


def parse(argv: list[str]) -> tuple[ArgumentParser, Namespace]:
    """Parse twice: once to learn whether ``concat`` is set (flag or YAML), then with its defaults,
    so that explicit values (YAML or command line) always win over the preset."""
    first = [arg for arg in argv if not arg.startswith("--print_config")]
    concat = bool(build_parser().parse_args(first).concat)
    parser = build_parser(concat=concat)
    return parser, parser.parse_args(argv)


@dataclass
class TrainResult:
    trainer: Any  # pl.Trainer
    module: Any  # ProteinLM
    datamodule: Any  # ProteinDataModule
    run_dir: Path


def _default_run_dir(cfg: Namespace) -> Path:
    configs = cfg.get("config") or []
    stem = Path(str(configs[-1])).stem if configs else f"performer-{cfg.model.kernel}"
    mode = "bi" if cfg.bidirectional else "uni"
    return Path("runs") / (stem if stem.endswith(mode) else f"{stem}-{mode}")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_loggers(cfg: Namespace, run_dir: Path) -> list[Any]:
    """CSV always (logs/version_N), wandb when asked (offline without credentials), TensorBoard."""
    from pytorch_lightning.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if cfg.wandb:
        from pytorch_lightning.loggers import WandbLogger

        offline = not _has_wandb_credentials() or os.environ.get("WANDB_MODE") in (
            "offline",
            "disabled",
        )
        extra = {"mode": "offline"} if offline else {}  # never prompts for a login
        loggers.append(
            WandbLogger(
                project=cfg.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=offline,
                **extra,
            )
        )
    if cfg.tensorboard:
        from pytorch_lightning.loggers import TensorBoardLogger

        try:
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard"))
        except ModuleNotFoundError as error:
            raise SystemExit(f"--tensorboard needs `pip install tensorboard` ({error})") from error
    return loggers


def build_callbacks(cfg: Namespace, run_dir: Path, *, has_validation: bool) -> list[Any]:
    """Periodic + last checkpoints, best by validation perplexity, learning-rate monitor,
    training clock (``time/train_seconds``)."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    from protperf.lit import TrainingClock

    directory = str(run_dir / "checkpoints")
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=directory,
            filename="step{step:08d}",
            every_n_train_steps=cfg.checkpoint_every,
            monitor="step",  # keep the latest ones
            mode="max",
            save_top_k=cfg.keep_checkpoints,
            save_last=True,
            auto_insert_metric_name=False,
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


def run(parser: ArgumentParser, cfg: Namespace) -> TrainResult:
    """Train (and test, export, plot) as configured by ``cfg``; returns the trainer and module."""
    import pytorch_lightning as pl

    from protperf.data.datamodule import ProteinDataModule
    from protperf.export import export_model, model_from_state_dict
    from protperf.lit import BidirectionalLM, UnidirectionalLM
    from protperf.plot import plot_run

    if cfg.data is None:
        parser.error("--data DIR is required (a folder written by `protperf prepare-data`)")
    try:
        init = parser.instantiate(cfg)
    except ValueError as error:  # the config dataclasses validate themselves
        raise CommandError(f"invalid configuration: {error}") from error
    run_dir = Path(cfg.run_dir) if cfg.run_dir else _default_run_dir(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = None
    if last.exists() and not cfg.resume:
        raise SystemExit(
            f"{run_dir} already holds a run: pass --resume to continue it or another --run_dir"
        )
    if cfg.resume:
        if last.exists():
            ckpt_path = str(last)
        else:
            print(
                f"protperf train: no checkpoint in {run_dir}, starting from scratch",
                file=sys.stderr,
            )

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = ProteinDataModule(
        cfg.data,
        concat=cfg.concat,
        max_length=cfg.model.max_length,
        loader=init.loader,
        seed=cfg.seed,
    )
    try:  # before anything is written: a wrong --data leaves no run folder behind
        datamodule.check()
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"--data: {error}") from error
    if cfg.bidirectional:
        module = BidirectionalLM(
            init.model,
            init.optim,
            init.masking,
            redraw_every=cfg.redraw_every,
            redraw_until=cfg.redraw_until,
            seed=cfg.seed,
        )
    else:
        module = UnidirectionalLM(
            init.model,
            init.optim,
            redraw_every=cfg.redraw_every,
            redraw_until=cfg.redraw_until,
            seed=cfg.seed,
        )

    if cfg.compile:
        module.model.compile()  # in place: the state dict keeps its keys
    trainer_kwargs = dict(vars(init.trainer))
    user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    has_validation = datamodule.eval_dataloader("valid") is not None
    callbacks = build_callbacks(cfg, run_dir, has_validation=has_validation) + user_callbacks
    if not has_validation:
        trainer_kwargs["limit_val_batches"] = 0
    trainer = pl.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),
        logger=build_loggers(cfg, run_dir),
        callbacks=callbacks,
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        # With its run_dir filled in, the saved config resumes the run: --config it --resume.
        saved = cfg.clone()
        saved.run_dir, saved.resume = str(run_dir), False
        parser.save(saved, str(run_dir / "config.yaml"), overwrite=True, skip_validation=True)

    with float32_matmul_precision(cfg.float32_matmul_precision):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if cfg.test and datamodule.test_dataloader():
            trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
    # Gathered on every rank (FSDP shards the weights), written by rank 0.
    state_dict = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        export_model(
            model_from_state_dict(module.config, state_dict),
            run_dir / "export",
            mode=module.mode,
            metadata={"step": trainer.global_step, "data": str(cfg.data), "concat": cfg.concat},
        )
        try:
            plot_run(run_dir)
        except FileNotFoundError:  # nothing logged yet (fewer steps than log_every_n_steps)
            print(f"protperf train: no metrics to plot in {run_dir}", file=sys.stderr)
    return TrainResult(trainer, module, datamodule, run_dir)


def main(argv: list[str]) -> int:
    """``protperf train``: parse ``argv`` and train; returns the exit status."""
    # Intended: the LightningModule prepares (shifts / masks) the data module's batches.
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")
    # The data module, not the DataLoader, saves and restores the position in the epoch.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    parser, cfg = parse(argv)
    try:
        run(parser, cfg)
    except CommandError as error:
        print(f"protperf train: error: {error}", file=sys.stderr)
        return 1
    close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the ``torch.distributed`` process group of a finished multi-process run, if any.

    Call it once every rank is done with collectives. A gloo group left for the interpreter's exit
    can abort the process there ("terminate called without an active exception", SIGABRT), so a
    run that trained and exported correctly would exit non-zero. Not called after an exception: a
    rank that failed while others wait in a collective would hang in the teardown instead.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
