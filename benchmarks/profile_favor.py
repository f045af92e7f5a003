"""Profile one FAVOR+ forward + backward: wall time, busy device time and kernel count per length.

On a GPU, FAVOR+ at a few thousand tokens waits on kernel launches rather than arithmetic
(docs/benchmarks.md, "On a GPU"); this script shows how much: for each direction and length, the wall time
of a step (median of 10 after 3 warm-ups), the device time its kernels took (torch.profiler) and
how many kernels it launched, plus the busiest kernels at the middle length. ``--compile`` runs
the same through torch.compile to see how many launches fusion removes.

    python benchmarks/profile_favor.py --device cuda              # bf16 autocast, 1k/8k/32k
    python benchmarks/profile_favor.py --device cpu --lengths 256 512 --no-autocast
    python benchmarks/profile_favor.py --device cuda --backend triton   # the Triton kernels
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protperf.attention import FastAttention


def profile_one(device: torch.device, causal: bool, length: int, args) -> dict:
    """Time and profile one configuration; prints its line, returns the numbers."""
    attention = FastAttention(
        head_dim=64, num_features=256, causal=causal, backend=args.backend
    ).to(device)
    call = torch.compile(attention) if args.compile else attention
    q, k, v = (torch.randn(1, 8, length, 64, device=device, requires_grad=True) for _ in range(3))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            out = call(q, k, v)
        out.float().sum().backward()

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type.name == "CUDA"]
    result = {
        "direction": "causal" if causal else "bidirectional",
        "length": length,
        "wall_ms": statistics.median(times) * 1e3,
        "device_ms": sum(e.self_device_time_total for e in on_device) / 1e3,
        "kernels": sum(e.count for e in on_device),
        "operators": sum(e.count for e in events if e.key.startswith("aten::")),
    }
    print(
        f"{result['direction']:>13} L={length:>6}: wall {result['wall_ms']:7.2f} ms, "
        f"device busy {result['device_ms']:7.2f} ms, {result['kernels']:4d} kernels, "
        f"{result['operators']:4d} aten calls",
        flush=True,
    )
    if length == args.lengths[len(args.lengths) // 2]:
        sort = "self_device_time_total" if on_device else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.top), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast around the call (FAVOR+ computes in float32 inside)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the attention")
    parser.add_argument("--top", type=int, default=12, help="kernels listed at the middle length")
    parser.add_argument("--backend", default="torch", choices=["auto", "torch", "triton"],
                        help="FAVOR+'s kernels (torch: the PyTorch kernels)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}, {args.backend} kernels, "
          f"{'compiled' if args.compile else 'eager'}, "
          f"{'bf16 autocast' if args.autocast else 'float32'}; batch 1, 8 heads, head dim 64, m 256")  # fmt: skip
    for causal in (False, True):
        for length in args.lengths:
            profile_one(device, causal, length, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
