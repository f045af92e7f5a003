"""Attention forward+backward time and peak memory: protperf FAVOR+ vs exact vs performer-pytorch.

Every configuration runs in its own process (so that peak memory is that configuration's alone),
all in the same invocation, on the same inputs: batch 1, 8 heads, head dim 64, m = 256 random
features, float32 by default. Time is the median of several forward+backward passes after up to
three warm-up passes (fewer when they are slow: the first passes at long lengths fault in fresh
memory); memory is the process's peak resident set size (and, on CUDA, the peak allocated).

    python benchmarks/attention.py                       # the table in docs/benchmarks.md (CPU)
    python benchmarks/attention.py --lengths 1024 8192   # a quick look
    python benchmarks/attention.py --device cuda --dtype bf16

Contenders: ``protperf`` (protperf.attention.FastAttention, softmax kernel, its PyTorch
kernels), ``protperf-triton`` (the same module on its Triton kernels: CUDA, or Triton's CPU
interpreter), ``exact`` (torch.nn.functional.scaled_dot_product_attention),
``performer-pytorch`` (FastAttention of the performer-pytorch package, its non-CUDA causal path
on a CPU). The process-level settings of protperf.runtime (allocator, flush-to-zero) are applied
to every contender alike (``--no-tune-allocator`` to compare without them), and so is the
float32 matmul precision (``--float32-matmul-precision``, "high" as ``protperf train``: TF32
tensor-core products on CUDA, IEEE float32 on CPUs).

    python benchmarks/attention.py --device cuda --dtype bf16 \
        --implementations protperf protperf-triton exact --lengths 8192 32768 131072
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("protperf", "exact", "performer-pytorch")
#: Every contender; the default run is IMPLEMENTATIONS (the CPU table).
ALL_IMPLEMENTATIONS = ("protperf", "protperf-triton", "exact", "performer-pytorch")
LABELS = {"exact": "exact (SDPA)", "protperf-triton": "protperf (Triton)"}
DIRECTIONS = ("bidirectional", "causal")
DEFAULT_LENGTHS = (1024, 4096, 8192, 16384, 32768)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_attention(implementation: str, causal: bool, head_dim: int, num_features: int):
    """A callable (q, k, v) -> out for one contender."""
    import torch.nn.functional as F

    if implementation in ("protperf", "protperf-triton"):
        from protperf.attention import FastAttention

        backend = "triton" if implementation == "protperf-triton" else "torch"
        return FastAttention(
            head_dim=head_dim, num_features=num_features, kernel="softmax", causal=causal,
            backend=backend,
        )  # fmt: skip
    if implementation == "exact":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if implementation == "performer-pytorch":
        import contextlib
        import io

        from performer_pytorch import FastAttention as PerformerFastAttention

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning on CPUs
            return PerformerFastAttention(
                dim_heads=head_dim, nb_features=num_features, causal=causal
            )
    raise ValueError(implementation)


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process; returns the measurement as a dict."""
    if args.tune_allocator:
        from protperf.runtime import tune_process

        tune_process()
    import torch

    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    causal = args.direction == "causal"
    attention = build_attention(args.implementation, causal, args.head_dim, args.num_features)
    if isinstance(attention, torch.nn.Module):
        attention = attention.to(device)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def step() -> None:
        out = attention(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    synchronize()
    first = time.perf_counter() - start
    # More warm-up passes while they are cheap: the first passes at long lengths fault in fresh
    # memory (heap growth, huge pages) and run up to twice as slow as the steady state.
    for _ in range(min(args.warmup, int(args.budget_s / max(first, 1e-3))) - 1):
        step()
        synchronize()
    repeats = max(1, min(args.repeats, int(args.budget_s / max(first, 1e-3))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "time_s": statistics.median(times),
        "repeats": repeats,
        "peak_rss_mb": _peak_rss_mb(),
        "base_rss_mb": base_rss,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure(config: dict, args: argparse.Namespace) -> dict:
    """Run one configuration in a fresh process; a failure or timeout becomes a note."""
    command = [
        sys.executable, __file__, "--worker",
        "--implementation", config["implementation"], "--direction", config["direction"],
        "--length", str(config["length"]), "--device", args.device, "--dtype", args.dtype,
        "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
        "--warmup", str(args.warmup),
        "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
        "--num-features", str(args.num_features),
        "--float32-matmul-precision", args.float32_matmul_precision,
    ]  # fmt: skip
    if not args.tune_allocator:
        command.append("--no-tune-allocator")
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"note": f"timeout > {args.timeout_s:.0f} s"}
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["?"]
        killed = completed.returncode < 0
        return {"note": "killed (out of memory?)" if killed else f"failed: {tail[0][:80]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def skip_reason(config: dict, results: dict, args: argparse.Namespace) -> str | None:
    """Skip what cannot finish: predicted from the same contender at half the length."""
    previous = results.get((config["implementation"], config["direction"], config["length"] // 2))
    if previous is None:
        return None
    if "note" in previous:
        return "skipped: " + previous["note"].split(" (")[0]
    # Quadratic contenders double at least; predict 4x time for exact, 2x memory for the rest.
    growth = 4.0 if config["implementation"] == "exact" else 2.0
    predicted_time = previous["time_s"] * growth
    predicted_memory = (
        previous["base_rss_mb"] + (previous["peak_rss_mb"] - previous["base_rss_mb"]) * 2
    )
    if args.device == "cpu" and predicted_memory > args.memory_limit_gb * 1024:
        return f"skipped: needs ~{predicted_memory / 1024:.0f} GB"
    if predicted_time * 2 > args.timeout_s:
        return f"skipped: ~{predicted_time:.0f} s per step"
    return None


def format_table(results: dict, lengths, args: argparse.Namespace) -> str:
    """Markdown tables: times with ratios, then peak memory (the contenders that ran)."""
    implementations = [i for i in ALL_IMPLEMENTATIONS if i in args.implementations]
    triton = "protperf-triton" in implementations

    def cell(implementation, direction, length, key="time_s"):
        result = results.get((implementation, direction, length), {})
        if "note" in result:
            return result["note"]
        if key not in result:
            return "—"
        return f"{result[key]:.3f}" if key == "time_s" else f"{result[key] / 1024:.2f}"

    def ratio(implementation, direction, length, mine="protperf"):
        mine = results.get((mine, direction, length), {}).get("time_s")
        other = results.get((implementation, direction, length), {}).get("time_s")
        return f"{other / mine:.1f}×" if mine and other else "—"

    ratios = [("vs exact", "exact", "protperf")]
    if "performer-pytorch" in implementations or not triton:
        ratios.append(("vs performer-pytorch", "performer-pytorch", "protperf"))
    if triton:
        ratios += [("Triton vs exact", "exact", "protperf-triton"),
                   ("Triton vs protperf", "protperf", "protperf-triton")]  # fmt: skip
    lines = []
    for direction in DIRECTIONS:
        if direction not in args.directions:
            continue
        names = [LABELS.get(i, i) for i in implementations] + [name for name, _, _ in ratios]
        lines += [
            f"\n**{direction}** — forward+backward seconds (median), speed-up of protperf",
            "",
            "| L | " + " | ".join(names) + " |",
            "|---" * (1 + len(names)) + "|",
        ]
        for length in lengths:
            cells = [cell(i, direction, length) for i in implementations]
            cells += [ratio(other, direction, length, mine) for _, other, mine in ratios]
            lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
        for mine in ("protperf", "protperf-triton"):
            t8 = results.get((mine, direction, 8192), {}).get("time_s")
            t32 = results.get((mine, direction, 32768), {}).get("time_s")
            if t8 and t32:
                lines.append(
                    f"\n{mine} {direction}: time ×{t32 / t8:.2f} from L = 8,192 to 32,768 (linear: ×4)."
                )
    memory_key = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    label = (
        "peak CUDA memory allocated"
        if args.device == "cuda"
        else "peak process RSS (incl. ~0.2 GB of PyTorch itself)"
    )
    lines += [f"\n**memory** — {label}, GB", ""]
    columns = [(i, d) for d in DIRECTIONS if d in args.directions for i in implementations]
    header = "| L | " + " | ".join(f"{i} {d[:4]}." for i, d in columns) + " |"
    lines += [header, "|---" * (1 + len(columns)) + "|"]
    for length in lengths:
        cells = [cell(i, d, length, memory_key) for i, d in columns]
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description(args: argparse.Namespace) -> str:
    import torch

    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                name = next(
                    line.split(":", 1)[1].strip()
                    for line in handle
                    if line.startswith("model name")
                )
        except (OSError, StopIteration):
            pass
        name = f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return (
        f"{name}; torch {torch.__version__}; {args.dtype}; float32 matmul "
        f"{args.float32_matmul_precision}; batch {args.batch}, {args.heads} heads, head dim "
        f"{args.head_dim}, m = {args.num_features}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument(
        "--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=ALL_IMPLEMENTATIONS
    )
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed passes per configuration (at most)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed passes first (fewer if over --budget-s)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=20.0, help="time budget of the timed passes"
    )
    parser.add_argument("--timeout-s", type=float, default=400.0, help="per configuration")
    parser.add_argument(
        "--memory-limit-gb", type=float, default=20.0, help="skip what would need more"
    )
    parser.add_argument("--no-tune-allocator", dest="tune_allocator", action="store_false")
    parser.add_argument(
        "--float32-matmul-precision",
        default="high",
        choices=("highest", "high", "medium"),
        help="as protperf train's (high: TF32 on CUDA, IEEE float32 on CPUs)",
    )
    parser.add_argument("--json", help="also write the raw results here")
    # Worker mode (one configuration, internal).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", help=argparse.SUPPRESS)
    parser.add_argument("--direction", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    results: dict = {}
    for length in args.lengths:
        for direction in args.directions:
            for implementation in args.implementations:
                config = {
                    "implementation": implementation,
                    "direction": direction,
                    "length": length,
                }
                reason = skip_reason(config, results, args)
                result = {"note": reason} if reason else measure(config, args)
                results[(implementation, direction, length)] = result
                shown = (
                    result.get("note")
                    or f"{result['time_s']:.3f} s, peak RSS {result['peak_rss_mb'] / 1024:.2f} GB"
                )
                print(
                    f"  {implementation:>18} {direction:>13} L={length:>6}: {shown}",
                    file=sys.stderr,
                    flush=True,
                )
    print(f"Machine: {machine_description(args)}")
    print(format_table(results, args.lengths, args))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                [
                    {"implementation": i, "direction": d, "length": n, **r}
                    for (i, d, n), r in results.items()
                ],
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
