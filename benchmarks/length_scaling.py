"""The paper's speed figure: one training pass of the whole model against L, for every kernel,
each step's peak memory, and the longest L that fits in a memory budget (16 GB, the paper's).

The model is the paper's speed-figure shape (6 layers, d 512, 8 heads, d_ff 2,048, batch 1; FAVOR+
with m = 256), random weights, float32 on a CPU (``--precision bf16-mixed`` on a GPU). One
forward + backward pass is timed at L = 1,024, 2,048, ... for each contender:

* OPT, the ceiling: the same model whose attention returns V;
* exact attention twice: PyTorch's fused ``scaled_dot_product_attention`` (its flash and
  memory-efficient kernels never hold the L x L matrix) and the paper's materialized
  softmax(QK^T)V, which does;
* FAVOR+ (softmax, m = 256) and the generalized Performer (ReLU);
* Reformer (LSH attention: chunks of 64, 4 hash rounds) and Linformer (k = 256, bidirectional);

causal and bidirectional. Every (contender, L) runs in a fresh process: the peak memory is that
step's alone (the process's peak RSS on a CPU, ``max_memory_allocated`` on a GPU), with the model,
its gradients and the libraries included. A curve ends at the first L whose step exceeds the
memory budget (the process is killed when it crosses it) or the time cap (``--time-cap``: a step
that takes longer is stopped there), and the table says which. The first step of a process is
a warm-up; when it takes under ``--repeat-under`` seconds a second one is timed and the faster
one kept.

Then the paper's concat claim: at L = 8,192 (``--concat-length``), the step's memory at batch 1
and the largest batch that fits in the budget. The step's memory is affine in the batch, so the
largest batch is predicted from batches 1 and 2 and then run to confirm that it fits (one smaller
at a time until one does); the table says which batches were run.

Every measurement is appended to OUT/points.jsonl as it is made, keyed by the contender, L, batch
and the model's shape; a rerun reuses the ones there, so a stopped run resumes where it was.
Delete the file to measure again.

Then the decoding curve: tokens/s of one decoding step (batch 1, the same shape, causal) at
positions doubling from 1,024, FAVOR+'s constant state against the key/value cache of exact
attention (protperf's own), up to the longest prompt whose cache fits in the budget. The cache is
filled with random keys and values of the prompt's length instead of decoding the prompt token by
token, which would take hours and costs the same per step afterwards.

    python benchmarks/length_scaling.py                       # the tables and the figure
    python benchmarks/length_scaling.py --contenders "FAVOR+ ReLU, causal" --max-length 8192
    python benchmarks/length_scaling.py --device cuda --precision bf16-mixed
    python benchmarks/length_scaling.py --layers 1 --dim 64 --heads 2 --ff-dim 128 \\
        --max-length 2048 --no-decode --out /tmp/scaling     # the pipeline in seconds

Writes OUT/length_scaling.json, OUT/length_scaling.md and OUT/length_scaling.png (step time and
peak memory against L, log-log, and decoding tokens/s against position).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

#: name -> (kernel, causal); "opt" and "materialized" are the benchmark's own attentions.
CONTENDERS = {
    "OPT": ("opt", False),
    "exact (SDPA), bidirectional": ("exact", False),
    "exact (SDPA), causal": ("exact", True),
    "exact (materialized), bidirectional": ("materialized", False),
    "exact (materialized), causal": ("materialized", True),
    "FAVOR+ softmax, bidirectional": ("softmax", False),
    "FAVOR+ softmax, causal": ("softmax", True),
    "FAVOR+ ReLU, bidirectional": ("relu", False),
    "FAVOR+ ReLU, causal": ("relu", True),
    "Reformer, bidirectional": ("reformer", False),
    "Reformer, causal": ("reformer", True),
    "Linformer, bidirectional": ("linformer", False),
}
GB = 1024**3
MB = 1024**2


# ---------------------------------------------------------------------------------------------
# Worker: one contender at one length, in its own process
# ---------------------------------------------------------------------------------------------


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _vm_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":")))


def _attention_module(kind: str, causal: bool):
    """OPT (returns V) or the paper's materialized softmax attention, FastAttention's signature."""
    import torch
    from torch import nn

    class ReturnValues(nn.Module):
        def forward(self, q, k, v, key_padding_mask=None):
            return v

    class Materialized(nn.Module):
        def forward(self, q, k, v, key_padding_mask=None):
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, L, L)
            if causal:
                future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, -torch.inf)
            return scores.softmax(dim=-1) @ v

    return ReturnValues() if kind == "opt" else Materialized()


def build_model(args: argparse.Namespace, kernel: str, causal: bool, length: int):
    """The speed-figure model with ``kernel``'s attention (random weights, seed 0)."""
    import torch

    from protperf.model import PerformerConfig, PerformerLM

    torch.manual_seed(0)
    native = kernel not in ("opt", "materialized")
    config = PerformerConfig(
        dim=args.dim, depth=args.layers, heads=args.heads, ff_dim=args.ff_dim,
        num_features=args.num_features, max_length=length, dropout=0.1, causal=causal,
        kernel=kernel if native else "exact",
    )  # fmt: skip
    model = PerformerLM(config)
    if not native:
        for block in model.blocks:
            block.attn.attention = _attention_module(kernel, causal)
    return model


def worker(args: argparse.Namespace) -> None:
    """Time forward + backward steps of one contender at one length; prints JSON events."""
    from protperf.runtime import tune_process

    tune_process()
    import torch
    from train_throughput import random_batch  # benchmarks/ is the script's folder

    kernel, causal = CONTENDERS[args.contender]
    device = torch.device(args.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * GB / total), device)
    model = build_model(args, kernel, causal, args.length).to(device)
    batch = random_batch(args.batch, args.length, causal)
    inputs, targets = (t.to(device) for t in batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16-mixed")  # fmt: skip

    def step() -> float:
        start = time.perf_counter()
        with autocast:
            loss = model(inputs, targets=targets)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    _emit(event="ready")
    times = [step()]
    if times[0] < args.repeat_under:
        times.append(step())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _vm_kib("VmHWM") * 1024
    _emit(event="done", seconds=min(times), steps=len(times), peak_bytes=peak,
          threads=torch.get_num_threads())  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in text.splitlines() if line.startswith("VmRSS:")), "VmRSS: 0")
    return int(line.split()[1]) * 1024


def measure(
    args: argparse.Namespace,
    contender: str,
    length: int,
    batch: int = 1,
    time_cap: float | None = None,
) -> dict:
    """One step of ``contender`` at (``batch``, ``length``) in a fresh process, or the same
    measurement from OUT/points.jsonl; returns {"seconds", "peak_bytes"} or {"ended": "memory" |
    "time" | error}."""
    time_cap = args.time_cap if time_cap is None else time_cap
    key = [contender, length, batch, time_cap, *_shape_args(args)]
    return _remembered(args, key, lambda: _run_worker(args, contender, length, batch, time_cap))


def _remembered(args: argparse.Namespace, key: list, compute) -> dict:
    """``compute()``'s result, or the result recorded under ``key`` in OUT/points.jsonl: a
    killed run loses at most the point it was measuring."""
    key = json.dumps(key)
    cache = args.out / "points.jsonl"
    if cache.exists():
        for line in cache.read_text().splitlines():
            record = json.loads(line)
            if record["key"] == key:
                return record["result"]
    result = compute()
    if not str(result.get("ended", "")).startswith("error"):  # an error is worth a retry
        with cache.open("a") as file:
            file.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


def _run_worker(
    args: argparse.Namespace, contender: str, length: int, batch: int, time_cap: float
) -> dict:
    command = [sys.executable, __file__, "--worker", "--contender", contender,
               "--length", str(length), "--batch", str(batch), *_shape_args(args)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    started, ready_at, result = time.perf_counter(), None, None
    ended = None
    while result is None and ended is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        if line is None:
            process.wait()
            error = process.stderr.read().strip().splitlines()
            memory = "out of memory" in (error[-1] if error else "").lower()
            ended = "memory" if memory or process.returncode == -9 else f"error: {error[-1:]}"
            break
        if line.strip():
            event = json.loads(line)
            if event["event"] == "ready":
                ready_at = time.perf_counter()
            elif event["event"] == "done":
                result = event
        if args.device == "cpu" and _rss_bytes(process.pid) > args.budget_gb * GB:
            ended = "memory"
        else:
            now = time.perf_counter()
            stepping = ready_at is not None and now - ready_at > time_cap
            if stepping or now - started > time_cap + args.setup_cap:
                ended = "time"
    if process.poll() is None:
        process.kill()
    process.wait()
    if ended is not None:
        return {"ended": ended}
    if result["peak_bytes"] > args.budget_gb * GB:
        return {"ended": "memory", "peak_bytes": result["peak_bytes"]}
    return result


def _shape_args(args: argparse.Namespace) -> list[str]:
    return [
        "--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads),
        "--ff-dim", str(args.ff_dim), "--num-features", str(args.num_features),
        "--device", args.device, "--precision", args.precision, "--budget-gb", str(args.budget_gb),
        "--repeat-under", str(args.repeat_under),
    ]  # fmt: skip


def lengths(args: argparse.Namespace) -> list[int]:
    out, length = [], args.min_length
    while length <= args.max_length:
        out.append(length)
        length *= 2
    return out


def scaling_curves(args: argparse.Namespace) -> dict[str, dict]:
    """{contender: {"points": {L: measurement}, "longest": L or None, "ended": why}}."""
    curves = {}
    for contender in args.contenders:
        points, longest, ended = {}, None, "the longest length asked for"
        for length in lengths(args):
            result = measure(args, contender, length)
            shown = (
                ("ended by " + result["ended"])
                if "ended" in result
                else (f"{result['seconds']:.2f} s, peak {result['peak_bytes'] / GB:.2f} GB")
            )
            print(f"{contender:<38} L {length:>7,}: {shown}", flush=True)
            if "ended" in result:
                ended = result["ended"]
                break
            points[length], longest = result, length
        curves[contender] = {"points": points, "longest": longest, "ended": ended}
    return curves


def largest_batch(args: argparse.Namespace, contender: str, length: int, one: dict):
    """(largest batch, what stopped it, [[batch, fits]]) given the batch-1 step ``one`` that fit.

    Batch 2 gives the memory and time per sequence. The search starts at the batch predicted to
    fill the budget, then bisects between the largest batch that fitted and the smallest that went
    over. A batch whose step would pass ``--batch-time-cap`` is not run: the search stops below
    it, and the largest batch is a lower bound ("time")."""
    cap, runs = args.batch_time_cap, [[1, True]]
    two = measure(args, contender, length, 2, cap)
    runs.append([2, "ended" not in two])
    if "ended" in two:
        return 1, two["ended"], runs
    per_sequence = max(two["peak_bytes"] - one["peak_bytes"], 1)
    predicted = 1 + int((args.budget_gb * GB - one["peak_bytes"]) // per_sequence)
    in_time = int(0.9 * cap / (two["seconds"] / 2))
    fitted, over, probe = 2, None, max(3, min(predicted, in_time))
    while over is None or over - fitted > 1:
        if probe > in_time:
            return fitted, "time", runs
        result = measure(args, contender, length, probe, cap)
        runs.append([probe, "ended" not in result])
        if result.get("ended") == "memory":
            over = probe
        elif "ended" in result:
            return fitted, result["ended"], runs
        else:
            fitted = probe
        probe = fitted + 1 if over is None else (fitted + over) // 2
    return fitted, "memory", runs


def concat_batches(args: argparse.Namespace) -> dict[str, dict]:
    """{contender: {"batch_1": measurement, "largest": B, "limit": "memory" | "time" | None,
    "runs": [[batch, fits]]}} at L = ``--concat-length``: the step's memory at batch 1 and the
    largest batch within the budget (:func:`largest_batch`)."""
    length, table = args.concat_length, {}
    for contender in args.contenders:
        one = measure(args, contender, length)
        if "ended" in one:
            largest, limit, runs = 0, one["ended"], [[1, False]]
        else:
            largest, limit, runs = largest_batch(args, contender, length, one)
        row = {"batch_1": one, "largest": largest, "limit": limit, "runs": runs}
        table[contender] = row
        shown = largest if limit != "time" else f">= {largest} (time cap)"
        print(f"{contender:<38} L {length:,}: largest batch {shown} (runs {runs})", flush=True)
    return table


def decoding_curve(args: argparse.Namespace) -> dict:
    """tokens/s and state bytes at each position: FAVOR+ (softmax and ReLU) and the KV cache.

    The cache's curve ends where a step no longer fits the budget: appending a token copies the
    cache, so the step holds it twice.
    """
    per_token = args.layers * 2 * args.dim * 4  # keys and values of every layer, float32
    curves: dict[str, dict[int, dict]] = {}
    for name, kernel in (("FAVOR+ softmax", "softmax"), ("FAVOR+ ReLU", "relu"),
                         ("exact, KV cache", "exact")):  # fmt: skip
        curves[name] = {}
        position = 1024
        while position <= args.max_decode_position:
            if kernel == "exact" and 2 * position * per_token > args.budget_gb * GB:
                break
            key = ["decode", kernel, position, args.decode_seconds, *_shape_args(args)]
            point = _remembered(args, key, partial(_decode_point, args, kernel, position))
            curves[name][position] = point
            print(f"decode {name:<16} position {position:>9,}: {point['tokens_per_s']:8.1f} "
                  f"tokens/s, state {point['state_bytes'] / MB:,.2f} MB", flush=True)  # fmt: skip
            position *= 2
    return curves


def _decode_point(args: argparse.Namespace, kernel: str, position: int) -> dict:
    """{"tokens_per_s", "state_bytes"} of one decoding step at ``position`` (batch 1), the same
    state each time: FAVOR+'s state is the same size at every position, the cache random."""
    import torch
    from embed_generate import state_bytes  # benchmarks/ is the script's folder

    from protperf.attention import DecodeState
    from protperf.model import LayerState

    torch.set_num_threads(args.threads)
    model = build_model(args, kernel, True, 1024).eval()
    token = torch.tensor([7])
    with torch.no_grad():
        _, states = model.decode_step(token, None, 0)
        if kernel == "exact":
            head_dim = args.dim // args.heads
            states = [LayerState(DecodeState(
                torch.randn(1, args.heads, position, head_dim),
                torch.randn(1, args.heads, position, head_dim)), None)
                for _ in range(args.layers)]  # fmt: skip
        steps, start = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - start < args.decode_seconds:
            model.decode_step(token, states, position)
            steps += 1
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps / seconds, "state_bytes": state_bytes(states)}


def _time_cell(point: dict | None) -> str:
    return "" if point is None else f"{point['seconds']:.3g}"


def format_concat(args: argparse.Namespace, table: dict) -> list[str]:
    lines = ["", f"The concat data: one step at L = {args.concat_length:,}, and the largest batch "
             f"within {args.budget_gb:g} GB", "",
             "| contender | batch 1: peak (GB) | batch 1: step (s) | largest batch | batches run |",
             "|---|---:|---:|---:|---|"]  # fmt: skip
    for name, row in table.items():
        one = row["batch_1"]
        peak = f"{one['peak_bytes'] / GB:.2f}" if "ended" not in one else f"over ({one['ended']})"
        largest = f"{row['largest']}" + (" (time cap: at least)" if row["limit"] == "time" else "")
        runs = ", ".join(f"{b} {'fits' if fits else 'no'}" for b, fits in row["runs"])
        lines.append(f"| {name} | {peak} | {_time_cell(one if 'ended' not in one else None)} | "
                     f"{largest} | {runs} |")  # fmt: skip
    return lines


def format_tables(args: argparse.Namespace, curves: dict, decode: dict | None) -> str:
    all_lengths = sorted({length for c in curves.values() for length in c["points"]})
    head = "| contender | " + " | ".join(f"{length:,}" for length in all_lengths) + " |"
    rule = "|---|" + "---:|" * len(all_lengths)
    lines = ["Forward + backward step (s) against L; blank: past the curve's end", "", head, rule]
    for name, curve in curves.items():
        cells = [_time_cell(curve["points"].get(length)) for length in all_lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Peak memory of the step's process (GB) against L", "", head, rule]
    for name, curve in curves.items():
        cells = [(f"{p['peak_bytes'] / GB:.2f}" if (p := curve["points"].get(length)) else "")
                 for length in all_lengths]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    opt = curves.get("OPT", {}).get("points", {})
    lines += ["", f"Longest L within {args.budget_gb:g} GB and {args.time_cap:g} s a step:", "",
              "| contender | longest L | step (s) | vs OPT at that L | peak (GB) | ended by |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, curve in curves.items():
        longest = curve["longest"]
        if longest is None:
            lines.append(f"| {name} | none | | | | {curve['ended']} |")
            continue
        point = curve["points"][longest]
        ratio = f"{point['seconds'] / opt[longest]['seconds']:.2f}x" if longest in opt else ""
        lines.append(f"| {name} | {longest:,} | {_time_cell(point)} | {ratio} | "
                     f"{point['peak_bytes'] / GB:.2f} | {curve['ended']} |")  # fmt: skip
    if decode:
        positions = sorted({p for c in decode.values() for p in c})
        lines += ["", "Decoding (batch 1, causal): tokens/s (state or cache, MB):", "",
                  "| position | " + " | ".join(decode) + " |", "|---:|" + "---:|" * len(decode)]  # fmt: skip
        for position in positions:
            cells = [(f"{p['tokens_per_s']:.1f} ({p['state_bytes'] / MB:,.3g})"
                      if (p := decode[n].get(position)) else "") for n in decode]  # fmt: skip
            lines.append(f"| {position:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The curve's last marker says what ended it.
END_MARKERS = {"memory": "X", "time": "s"}


def plot(args: argparse.Namespace, curves: dict, decode: dict | None, path: Path) -> None:
    """The paper's figure: step time against L, log-log, one panel per direction with OPT dashed
    in both, each curve ending at its longest L (X: the next L went over the memory budget,
    square: over the time cap); then peak memory with the budget, and decoding tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = (2, 2) if decode else (1, 3)
    fig, axes = plt.subplots(*grid, figsize=(6 * grid[1], 4.8 * grid[0]))
    axes = axes.ravel()
    colors = dict(zip(["opt", "exact", "materialized", "softmax", "relu", "reformer", "linformer"],
                      plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))  # fmt: skip
    for name, curve in curves.items():
        points = sorted(curve["points"].items())
        if not points:
            continue
        kernel, causal = CONTENDERS[name]
        xs = [int(length) for length, _ in points]
        style = dict(color=colors[kernel], marker="o", markersize=3,
                     linestyle="--" if kernel == "opt" else "-")  # fmt: skip
        times = [p["seconds"] for _, p in points]
        for ax in axes[:2] if kernel == "opt" else [axes[1] if causal else axes[0]]:
            ax.plot(xs, times, label=name.split(",")[0], **style)
            if curve["ended"] in END_MARKERS:
                ax.plot(xs[-1:], times[-1:], END_MARKERS[curve["ended"]], color=style["color"],
                        markersize=9)  # fmt: skip
        axes[2].plot(xs, [p["peak_bytes"] / GB for _, p in points], label=name,
                     **{**style, "linestyle": ":" if causal else style["linestyle"]})  # fmt: skip
    axes[2].axhline(args.budget_gb, color="grey", linewidth=0.8)
    titles = ("bidirectional", "causal", "peak memory (dotted: causal)")
    labels = ("forward + backward (s)", "forward + backward (s)", "peak memory (GB)")
    for ax, title, label in zip(axes[:3], titles, labels, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="L", ylabel=label, title=title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # a panel with no curve has nothing to label
            ax.legend(fontsize=6)
    if decode:
        for name, points in decode.items():
            xs = sorted(points, key=int)
            axes[3].plot([int(x) for x in xs], [points[x]["tokens_per_s"] for x in xs],
                         marker="o", markersize=3, label=name)  # fmt: skip
        axes[3].set(xscale="log", yscale="log", xlabel="position", ylabel="tokens/s",
                    title="decoding, batch 1")  # fmt: skip
        axes[3].set_xscale("log", base=2)
        axes[3].grid(alpha=0.3, which="both")
        axes[3].legend(fontsize=7)
    fig.suptitle("One training step against L (X: next L over the memory budget, square: over "
                 "the time cap), and decoding")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(args: argparse.Namespace) -> str:
    import torch

    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.precision}"
    cpu = platform.processor() or platform.machine()
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ff-dim", type=int, default=2048)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--min-length", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=1 << 20)
    parser.add_argument("--budget-gb", type=float, default=16.0, help="memory budget (the paper's)")
    parser.add_argument("--time-cap", type=float, default=240.0, help="seconds a step may take")
    parser.add_argument("--setup-cap", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--repeat-under", type=float, default=30.0,
                        help="time a second step when the first took less (s)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each process")
    parser.add_argument("--concat-length", type=int, default=8192,
                        help="L of the largest-batch table (the concat data's)")  # fmt: skip
    parser.add_argument("--batch-time-cap", type=float, default=600.0,
                        help="seconds a step of the largest-batch table may take")  # fmt: skip
    parser.add_argument("--concat", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-decode-position", type=int, default=1 << 19)
    parser.add_argument("--decode-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("runs/length_scaling"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    # Every process on the same number of threads (the workers inherit it).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    curves = scaling_curves(args)
    concat = concat_batches(args) if args.concat else None
    decode = decoding_curve(args) if args.decode and args.device == "cpu" else None
    text = "\n".join([
        f"Model: {args.layers} layers, d {args.dim}, {args.heads} heads, d_ff {args.ff_dim}, "
        f"m = {args.num_features}, batch 1, {args.precision}. Machine: {machine(args)}.", "",
        format_tables(args, curves, decode), *(format_concat(args, concat) if concat else []), "",
    ])  # fmt: skip
    (args.out / "length_scaling.md").write_text(text)
    (args.out / "length_scaling.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves, "concat": concat,
         "decode": decode},
        indent=2) + "\n")  # fmt: skip
    plot(args, curves, decode, args.out / "length_scaling.png")
    print("\n" + text)
    print(f"wrote {args.out}/length_scaling.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
