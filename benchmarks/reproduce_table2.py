"""The paper's Table 2 at CPU scale on real proteins: Transformer, Performers, Reformer and
Linformer, test and OOD.

Every run is a config in configs/table2/ (one YAML per run, a complete `protperf train` config);
this script only loops over them with the `protperf` CLI, printing each command before it runs:

1. ``protperf prepare-data`` once into OUT/data: the UniProt reference proteomes of
   ``--proteomes-dir`` with two whole organisms held out as the OOD set (default S. cerevisiae
   and T. brucei: eukaryotes with no close relative among the others), the rest split into
   train / valid / test and concat chunks of 8,192 tokens.
2. ``protperf train --config configs/table2/X.yaml --data OUT/data --run_dir OUT/X`` for each
   selected config (``--runs``, default all). A run whose export exists is skipped; one with
   checkpoints/last.ckpt but no export (interrupted) is continued with ``--resume``.
3. ``protperf evaluate --split test ood --format json`` on each single-sequence run (kept in
   OUT/X/evaluate.json, redone only when the export is newer).
4. OUT/table2.md: Table 2 (accuracy and perplexity next to the empirical unigram baseline, train
   wall time from ``time/train_seconds`` in metrics.csv), the concat comparison and the targets'
   PASS/FAIL lines; OUT/results.json (the same numbers); OUT/curves.png (train dashed,
   validation solid: a row per mode against steps, the concat runs against training time).

Targets: every model's test perplexity at least 10% below the unigram baseline's; each
Performer's test perplexity within 3% of (or below) the Transformer of the same mode (Reformer
and Linformer are compared, not held to it: the paper reports them falling behind); in the concat
setting the Performer reaches the Transformer's final validation accuracy in less than half the
Transformer's time.

The concat comparison: ``protperf train`` logs ``time/train_seconds`` (wall time in training steps,
validation and checkpoints excluded; a resumed run continues its clock) at each validation. A_T is
the Transformer's accuracy at its last validation and T_T that validation's time. The Performer's
time to A_T interpolates linearly over time between the first two consecutive validations that
bracket A_T (the first validation's time if that one already reaches it; never reached: FAIL).
PASS when that time / T_T < 0.5.

    python benchmarks/reproduce_table2.py --runs 'uni-*'     # UNI rows (about 4 hours)
    python benchmarks/reproduce_table2.py --runs 'bid-*'     # BID rows
    python benchmarks/reproduce_table2.py --runs 'concat-*'  # the concat comparison
    python benchmarks/reproduce_table2.py                    # all: the finished ones are skipped
    python benchmarks/reproduce_table2.py --smoke --out /tmp/table2  # everything, in seconds
    python benchmarks/reproduce_table2.py --runs uni-transformer uni-reformer --seeds 1

``--seeds`` trains each selected config with those seeds (seed s > 0 in OUT/X-seed<s>); the
table reports every seed found under OUT for the selected configs: the mean, and each seed's
perplexity, so that the spread between seeds tells a real difference from noise.

``--train-arg`` adds a `protperf train` argument to every selected run, e.g.
``--runs bid-performer-softmax --train-arg=--redraw_until=0 --out runs/bid-redraw``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from protperf.attention import KERNEL_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs" / "table2"
PROTEOMES = REPO_ROOT.parent / "shared" / "data" / "proteomes"
DEFAULT_OOD = ["UP000002311-S.cerevisiae", "UP000008524-T.brucei"]
SOURCE_SUFFIXES = (".fasta", ".fasta.gz", ".fa", ".fa.gz", ".dat", ".dat.gz")
PREPARE_ARGS = ["--valid-fraction", "0.02", "--test-fraction", "0.05", "--concat-length", "8192"]

#: ``--smoke``: two small proteomes (E. coli held out) and tiny models, a few steps each.
SMOKE_PROTEOMES = ["UP000002717-S.elongatus", "UP000001425-Synechocystis"]
SMOKE_OOD = ["UP000000625-E.coli"]
SMOKE_PREPARE_ARGS = ["--valid-fraction", "0.05", "--test-fraction", "0.05", "--concat-length", "64"]  # fmt: skip
SMOKE_TRAIN_ARGS = [
    "--model.dim=32", "--model.depth=1", "--model.heads=2", "--model.ff_dim=64",
    "--model.max_length=64", "--model.num_features=16", "--optim.warmup_steps=1",
    "--loader.batch_size=8", "--loader.num_workers=0", "--trainer.max_steps=6",
    "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
]  # fmt: skip

MODES = {"unidirectional": "UNI", "bidirectional": "BID"}
#: Table 2's rows in order: the Transformer, the Performers, then the other efficient attentions.
MODELS = {kernel: KERNEL_NAMES[kernel] for kernel in ("exact", "relu", "softmax", "reformer",
                                                      "linformer")}  # fmt: skip
PERFORMERS = {MODELS["relu"], MODELS["softmax"]}
BASELINE = "empirical unigram baseline"
SETS = {"test": "test", "ood": "OOD"}
CLOCK = "time/train_seconds"  # logged by protperf.lit.TrainingClock
UNIGRAM_TARGET = 0.10  # test ppl at least 10% below the unigram baseline's
TRANSFORMER_TARGET = 0.03  # each Performer's test ppl at most 3% above its Transformer's
CONCAT_TARGET = 0.5  # Performer's time to the Transformer's final accuracy / the Transformer's


@dataclass
class Run:
    """One config of configs/table2 and its run folder OUT/<config name>."""

    name: str
    config: Path
    run_dir: Path
    mode: str  # unidirectional | bidirectional
    kernel: str  # a key of MODELS
    concat: bool
    seed: int = 0
    evaluation: dict | None = None  # evaluate's JSON

    @property
    def model(self) -> str:
        return MODELS[self.kernel]


def run_dir(out: Path, name: str, seed: int) -> Path:
    """OUT/NAME for seed 0 (the configs' own), OUT/NAME-seed<S> for another seed."""
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def select_runs(patterns: Sequence[str], out: Path, seeds: Sequence[int] = (0,)) -> list[Run]:
    """The configs whose name matches a pattern (``uni-transformer``, ``'bid-*'``), each with
    each of ``seeds``, in Table 2's order: UNI, BID, concat; Transformer first; seeds ascending."""
    configs = sorted(CONFIGS.glob("*.yaml"))
    runs = []
    for pattern in patterns:
        matches = [p for p in configs if fnmatch.fnmatch(p.stem, pattern)]
        if not matches:
            names = ", ".join(p.stem for p in configs)
            raise SystemExit(f"no config in {CONFIGS} matches {pattern!r} (have: {names})")
        for path in matches:
            config = yaml.safe_load(path.read_text())
            mode = "bidirectional" if config.get("bidirectional") else "unidirectional"
            for seed in seeds:
                run = Run(path.stem, path, run_dir(out, path.stem, seed), mode,
                          config["model"]["kernel"], bool(config.get("concat")), seed)  # fmt: skip
                if run.run_dir not in [r.run_dir for r in runs]:
                    runs.append(run)
    order = list(MODES), list(MODELS)
    return sorted(runs, key=lambda r: (r.concat, order[0].index(r.mode), order[1].index(r.kernel),
                                       r.seed))  # fmt: skip


def finished_seeds(runs: list[Run], out: Path) -> list[Run]:
    """``runs`` and, for their configs, every other seed's run under ``out`` that has an
    export: what the table reports."""
    found = list(runs)
    for run in runs:
        folders = [(out / run.name, "0"), *((f, f.name.rsplit("-seed", 1)[1])
                                            for f in sorted(out.glob(f"{run.name}-seed*")))]  # fmt: skip
        for folder, seed in folders:
            exported = (folder / "export" / "model.safetensors").is_file()
            if seed.isdigit() and exported and folder not in [r.run_dir for r in found]:
                found.append(dataclasses.replace(run, run_dir=folder, seed=int(seed)))
    order = list(MODES), list(MODELS)
    return sorted(found, key=lambda r: (r.concat, order[0].index(r.mode), order[1].index(r.kernel),
                                        r.seed))  # fmt: skip


def protperf(argv: Sequence[object], *, in_process: bool, capture: bool = False) -> str:
    """Run ``protperf ARGV`` (printed first) here or in a subprocess; returns its stdout when
    ``capture``. Exits when the command fails."""
    argv = [str(arg) for arg in argv]
    print(f"$ {shlex.join(['protperf', *argv])}", flush=True)
    started = time.perf_counter()
    if in_process:
        import torch

        from protperf.cli import main as protperf_main

        stdout, threads = io.StringIO(), torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models gain nothing from more, and lose on a busy CPU
        with contextlib.redirect_stdout(stdout) if capture else contextlib.nullcontext():
            try:
                status = protperf_main(argv)
            except SystemExit as error:
                status = error.code if isinstance(error.code, int) else 1
            finally:
                torch.set_num_threads(threads)
        output = stdout.getvalue()
    else:
        script = Path(sys.executable).with_name("protperf")
        program = [str(script)] if script.exists() else [sys.executable, "-m", "protperf.cli"]
        pipe = subprocess.PIPE if capture else None
        done = subprocess.run([*program, *argv], stdout=pipe, text=True)
        status, output = done.returncode, done.stdout or ""
    print(f"  exit {status} after {time.perf_counter() - started:.1f} s", flush=True)
    if status != 0:
        raise SystemExit(f"protperf {argv[0]} failed (exit {status})")
    return output


def find_proteomes(folder: Path, names: Sequence[str]) -> list[Path]:
    """The proteome files in ``folder`` whose name starts with (or matches the glob) ``names``."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(SOURCE_SUFFIXES))
    found = []
    for name in names:
        matches = [p for p in files if fnmatch.fnmatch(p.name, name if "*" in name else name + "*")]
        if not matches:
            raise SystemExit(f"no proteome in {folder} matches {name!r}")
        found += [p for p in matches if p not in found]
    return found


def prepare(args: argparse.Namespace, in_process: bool) -> Path:
    """OUT/data from ``protperf prepare-data`` (reused when prepared from the same proteomes)."""
    ood = find_proteomes(args.proteomes_dir, args.ood)
    names = SMOKE_PROTEOMES if args.smoke else ["*"]
    train = [p for p in find_proteomes(args.proteomes_dir, names) if p not in ood]
    data = args.out / "data"
    manifest = data / "manifest.json"
    if manifest.is_file():
        made = json.loads(manifest.read_text())["sources"]
        sources = {(Path(source["url"]).name, source["ood"]) for source in made}
        if sources != {(p.name, False) for p in train} | {(p.name, True) for p in ood}:
            raise SystemExit(f"{data} was prepared from other proteomes: choose another --out")
        print(f"reusing {data}")
        return data
    argv = ["prepare-data", "--source", *train, "--ood-source", *ood, "--ood-families", "none"]
    argv += ["--out", data, *(SMOKE_PREPARE_ARGS if args.smoke else PREPARE_ARGS)]
    protperf(argv, in_process=in_process)
    return data


def train(run: Run, data: Path, extra: Sequence[str], in_process: bool) -> None:
    """Train ``run`` (``extra``: more `protperf train` arguments) unless it is exported; continue
    it from checkpoints/last.ckpt when it has one."""
    if (run.run_dir / "export" / "model.safetensors").is_file():
        print(f"skip {run.name}: exported in {run.run_dir}")
        return
    argv = ["train", "--config", run.config, "--data", data, "--run-dir", run.run_dir]
    argv += ["--seed", run.seed]
    if (run.run_dir / "checkpoints" / "last.ckpt").is_file():
        argv.append("--resume")
    protperf([*argv, *extra], in_process=in_process)


def evaluate(run: Run, data: Path, in_process: bool) -> dict:
    """evaluate's JSON on test and OOD, from OUT/X/evaluate.json unless the export is newer."""
    saved = run.run_dir / "evaluate.json"
    exported = run.run_dir / "export" / "model.safetensors"
    if not saved.is_file() or saved.stat().st_mtime < exported.stat().st_mtime:
        argv = ["evaluate", "--model", run.run_dir, "--data", data, "--split", "test", "ood"]
        stdout = protperf([*argv, "--format", "json"], in_process=in_process, capture=True)
        saved.write_text(stdout[stdout.index("{") :])
    return json.loads(saved.read_text())


def metrics(run: Run) -> dict[str, dict[int, float]]:
    from protperf.plot import read_metrics

    return read_metrics(run.run_dir)


def train_seconds(run: Run) -> float | None:
    """The run's training clock at its last logged step."""
    clock = metrics(run).get(CLOCK, {})
    return clock[max(clock)] if clock else None


def table2_rows(runs: list[Run]) -> list[dict]:
    """Per mode and set: the unigram baseline, then each model (the mean over its seeds, each
    seed's perplexity in ``seed_perplexities``) with its ratios; train seconds of the first seed."""
    rows = []
    for mode, kind in MODES.items():
        group = [r for r in runs if r.mode == mode and r.evaluation is not None]
        for split, set_name in SETS.items():
            scored = [r for r in group if split in r.evaluation["splits"]]
            if not scored:
                continue
            baseline = scored[0].evaluation["splits"][split]["baseline"]  # same tokens for all
            rows.append({"type": kind, "set": set_name, "model": BASELINE, **baseline})
            by_kernel: dict[str, list[Run]] = {}
            for run in scored:
                by_kernel.setdefault(run.kernel, []).append(run)
            means = {}
            for kernel, seeds in by_kernel.items():
                scores = [r.evaluation["splits"][split]["model"] for r in seeds]
                means[kernel] = {key: sum(s[key] for s in scores) / len(scores)
                                 for key in ("accuracy", "perplexity")}  # fmt: skip
                means[kernel]["seed_perplexities"] = [s["perplexity"] for s in scores]
            for kernel, seeds in by_kernel.items():
                row = {"type": kind, "set": set_name, "model": MODELS[kernel], **means[kernel]}
                row["seeds"] = [r.seed for r in seeds]
                row["ppl_vs_unigram"] = row["perplexity"] / baseline["perplexity"] - 1
                if "exact" in means and kernel != "exact":
                    row["ppl_vs_transformer"] = row["perplexity"] / means["exact"]["perplexity"] - 1
                rows.append({**row, "train_seconds": train_seconds(seeds[0])})
    return rows


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:+.1f}%"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def format_table2(rows: list[dict]) -> str:
    lines = [
        "| type | set | model | seeds | acc (%) | ppl | ppl per seed | ppl vs unigram "
        "| ppl vs Transformer | train wall (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        per_seed = " / ".join(f"{value:.2f}" for value in row.get("seed_perplexities", []))
        cells = [row["type"], row["set"], row["model"], str(len(row.get("seeds", [])) or ""),
                 f"{100 * row['accuracy']:.2f}", f"{row['perplexity']:.2f}", per_seed,
                 _percent(row.get("ppl_vs_unigram")), _percent(row.get("ppl_vs_transformer")),
                 _seconds(row.get("train_seconds"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2_checks(rows: list[dict]) -> list[dict]:
    """The targets on the test rows: vs the unigram for every model, vs the Transformer for
    every Performer. Each check: {"check": text, "pass": bool}."""
    checks = []
    for row in rows:
        if row["set"] != "test" or row["model"] == BASELINE:
            continue
        what = f"{row['type']} {row['model']}"
        diff = row["ppl_vs_unigram"]
        checks.append({
            "check": f"{what}: test ppl {row['perplexity']:.2f}, {_percent(diff)} vs the unigram "
            f"baseline (target: at most -{100 * UNIGRAM_TARGET:.0f}%)",
            "pass": diff <= -UNIGRAM_TARGET,
        })  # fmt: skip
        if "ppl_vs_transformer" in row and row["model"] in PERFORMERS:
            diff = row["ppl_vs_transformer"]
            checks.append({
                "check": f"{what}: test ppl {_percent(diff)} vs the Transformer "
                f"(target: at most +{100 * TRANSFORMER_TARGET:.0f}%)",
                "pass": diff <= TRANSFORMER_TARGET,
            })  # fmt: skip
    return checks


def validation_timeline(run: Run) -> list[tuple[int, float, float]]:
    """[(step, training seconds, validation accuracy)] at each validation of a run."""
    series = metrics(run)
    accuracy, clock = series.get("valid/accuracy", {}), series.get(CLOCK, {})
    return [(step, clock[step], value) for step, value in sorted(accuracy.items()) if step in clock]


def time_to_reach(timeline: list[tuple[int, float, float]], target: float) -> float | None:
    """Earliest time the accuracy reaches ``target``, interpolated linearly over time between
    consecutive validations; None if it never does."""
    previous = None
    for _, seconds, accuracy in timeline:
        if accuracy >= target:
            if previous is None or accuracy == previous[1]:
                return seconds
            t0, a0 = previous
            return t0 + (target - a0) / (accuracy - a0) * (seconds - t0)
        previous = (seconds, accuracy)
    return None


def concat_comparison(transformer: Run, performer: Run) -> dict:
    """A_T, T_T, the Performer's time to A_T and its ratio to T_T (see the module docstring)."""
    t_line, p_line = validation_timeline(transformer), validation_timeline(performer)
    if not t_line or not p_line:
        return {"error": f"no validation with `{CLOCK}` in metrics.csv", "passed": False}
    step_t, time_t, accuracy_t = t_line[-1]
    reach = time_to_reach(p_line, accuracy_t)
    ratio = None if reach is None else reach / time_t
    return {
        "performer": performer.model,
        "transformer_steps": step_t + 1,
        "transformer_accuracy": accuracy_t,
        "transformer_seconds": time_t,
        "performer_steps": p_line[-1][0] + 1,
        "performer_accuracy": p_line[-1][2],
        "performer_seconds": p_line[-1][1],
        "performer_seconds_to_transformer_accuracy": reach,
        "ratio": ratio,
        "passed": ratio is not None and ratio < CONCAT_TARGET,
    }


def format_concat(c: dict) -> str:
    if "error" in c:
        return f"Concat setting: not compared ({c['error']})."
    reach = c["performer_seconds_to_transformer_accuracy"]
    ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
    return "\n".join([
        "Concat setting, unidirectional (validation accuracy vs training seconds):",
        "",
        "| model | steps | final valid acc (%) | time at final valid (s) "
        "| time to the Transformer's final acc (s) | vs Transformer's time |",
        "|---|---:|---:|---:|---:|---:|",
        f"| Transformer | {c['transformer_steps']} | {100 * c['transformer_accuracy']:.2f} "
        f"| {_seconds(c['transformer_seconds'])} | {_seconds(c['transformer_seconds'])} | 1.00x |",
        f"| {c['performer']} | {c['performer_steps']} | {100 * c['performer_accuracy']:.2f} "
        f"| {_seconds(c['performer_seconds'])} | {_seconds(reach) or 'never'} | {ratio} |",
    ])  # fmt: skip


def concat_check(c: dict) -> dict:
    if "error" in c:
        return {"check": f"concat: {c['error']}", "pass": False}
    reached = "never" if c["ratio"] is None else f"at {c['ratio']:.2f}x the Transformer's time"
    return {
        "check": f"concat: {c['performer']} reaches the Transformer's final validation accuracy "
        f"{100 * c['transformer_accuracy']:.2f}% {reached} (target < {CONCAT_TARGET}x)",
        "pass": c["passed"],
    }


def plot_curves(runs: list[Run], rows: list[dict], out: Path) -> None:
    """Accuracy and perplexity, train dashed (moving average) and validation solid: a row per mode
    against steps (with the unigram baseline's test scores of ``rows`` dotted), one for the
    concat runs against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from protperf.plot import SMOOTHING, moving_average

    colors = {"exact": "tab:blue", "relu": "tab:orange", "softmax": "tab:green",
              "reformer": "tab:red", "linformer": "tab:purple"}  # fmt: skip
    runs = [r for r in runs if r.seed == 0]  # one curve per kernel: the configs' own seed
    panels = [(m, [r for r in runs if r.mode == m and not r.concat]) for m in MODES]
    panels += [("concat", [r for r in runs if r.concat])]
    panels = [(title, group) for title, group in panels if group]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.8 * len(panels)), squeeze=False)
    for (title, group), row_axes in zip(panels, axes, strict=True):
        for run in group:
            series = metrics(run)
            if title == "concat":  # step -> training seconds, interpolated between validations
                line = validation_timeline(run)
                clock = [-1.0] + [s for s, _, _ in line], [0.0] + [t for _, t, _ in line]
            for ax, metric in zip(row_axes, ("accuracy", "perplexity"), strict=True):
                for split, style in (("train", "--"), ("valid", "-")):
                    points = sorted(series.get(f"{split}/{metric}", {}).items())
                    if not points:
                        continue
                    steps, values = zip(*points, strict=True)
                    if split == "train":
                        values = moving_average(values, SMOOTHING)
                    xs = np.interp(steps, *clock) if title == "concat" else steps
                    ax.plot(xs, values, style, color=colors[run.kernel], markersize=3,
                            marker="o" if split == "valid" else None,
                            label=f"{run.model} ({split})")  # fmt: skip
        for row in rows:
            if (
                row["model"] == BASELINE
                and row["set"] == "test"
                and MODES.get(title) == row["type"]
            ):
                for ax, metric in zip(row_axes, ("accuracy", "perplexity"), strict=True):
                    ax.axhline(row[metric], color="grey", linestyle=":", label="unigram (test)")
        for ax, metric in zip(row_axes, ("accuracy", "perplexity"), strict=True):
            ax.set_xlabel("training seconds" if title == "concat" else "step")
            ax.set_title(f"{title}: {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Table 2 runs: train dashed, validation solid")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def describe_data(data: Path) -> str:
    """One line on the prepared data: proteomes, OOD organisms, sequences per split."""
    manifest = json.loads((data / "manifest.json").read_text())
    ood = ", ".join(Path(s["url"]).name.split(".fa")[0] for s in manifest["sources"] if s["ood"])
    splits = manifest.get("splits", {})
    counts = ", ".join(f"{name} {splits[name]['sequences']:,}" for name in splits)
    return (
        f"Data: {len(manifest['sources'])} UniProt reference proteomes; OOD = whole organisms "
        f"({ood}); sequences: {counts}. Unigram baseline = train-split residue frequencies "
        "(Laplace), scored on the same tokens as each model."
    )


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/table2"),
                        help="output folder (default %(default)s)")  # fmt: skip
    parser.add_argument("--proteomes-dir", type=Path, default=PROTEOMES)
    parser.add_argument("--ood", nargs="+", default=None, metavar="NAME",
                        help=f"organisms held out whole (default {' '.join(DEFAULT_OOD)})")  # fmt: skip
    parser.add_argument("--runs", nargs="+", default=["*"], metavar="CONFIG",
                        help=f"config names or globs in {CONFIGS.relative_to(REPO_ROOT)} "
                        "(default all)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                        help="train each selected config with these seeds (default 0, the "
                        "configs' own)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="small proteomes, tiny models, a few steps: all in seconds")  # fmt: skip
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="extra `protperf train` argument for every run, e.g. "
                        "--train-arg=--trainer.max_steps=300")  # fmt: skip
    args = parser.parse_args(argv)
    args.ood = args.ood or (SMOKE_OOD if args.smoke else DEFAULT_OOD)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.proteomes_dir.is_dir():
        print(f"no proteomes at {args.proteomes_dir} (see ../shared/data/README.md)")
        return 2
    in_process = args.smoke  # a subprocess costs seconds of imports; a long run gains isolation
    runs = select_runs(args.runs, args.out, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args, in_process)
    extra = [*(SMOKE_TRAIN_ARGS if args.smoke else []), *args.train_arg]
    for run in runs:
        train(run, data, extra, in_process)
    runs = finished_seeds(runs, args.out)
    for run in runs:
        if not run.concat:
            run.evaluation = evaluate(run, data, in_process)

    rows = table2_rows(runs)
    checks = table2_checks(rows)
    sections = ["# Table 2 at CPU scale: accuracy (%) and perplexity, test and OOD", ""]
    sections += [describe_data(data), ""]
    sections += [format_table2(rows)] if rows else ["(no single-sequence runs)"]
    first = [r for r in runs if r.seed == 0]
    transformer = next((r for r in first if r.concat and r.kernel == "exact"), None)
    performer = next((r for r in first if r.concat and r.kernel != "exact"), None)
    comparison = None
    if transformer and performer:
        comparison = concat_comparison(transformer, performer)
        sections += ["", format_concat(comparison)]
        checks.append(concat_check(comparison))
    sections += ["", "Targets:", ""]
    sections += [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']}" for c in checks]
    sections += ["", f"Machine: {machine()}. Curves: curves.png.", ""]
    (args.out / "table2.md").write_text("\n".join(sections))
    plot_curves(runs, rows, args.out / "curves.png")
    results = {
        "runs": {r.run_dir.name: {"config": str(r.config), "run_dir": str(r.run_dir),
                                  "mode": r.mode, "kernel": r.kernel, "concat": r.concat,
                                  "seed": r.seed, "evaluation": r.evaluation,
                                  "train_seconds": train_seconds(r)} for r in runs},
        "table2": rows,
        "concat": comparison,
        "checks": checks,
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + "\n".join(sections))
    print(f"wrote {args.out / 'table2.md'}, {args.out / 'results.json'}, {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
