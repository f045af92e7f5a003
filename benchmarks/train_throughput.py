"""Training throughput of the concat model shape: FAVOR+ vs exact attention vs "OPT", and the loader.

One training step = forward + backward + AdamW update of a PerformerLM (the paper's concat shape,
scaled to the machine: by default 2 layers, d 512, 8 heads, d_ff 2048, m = 256, dropout 0.1,
batch 1) at L = 8,192 and 32,768, with

* FAVOR+ (softmax kernel) bidirectional and causal,
* exact attention (scaled_dot_product_attention) bidirectional and causal,
* OPT, the paper's ceiling: the same model whose attention returns V unchanged.

Each configuration runs in its own process (peak RSS is that configuration's alone); the time is
the best of ``--steps`` steps after one warm-up step (the minimum resists interference from other
processes on a shared machine). Then the data loader alone reads concat
chunks (L = 8,192) from an HDF5 file in prepare-data's layout and its tokens/s is compared with
what the model consumes.

    python benchmarks/train_throughput.py                      # the table in docs/benchmarks.md (CPU)
    python benchmarks/train_throughput.py --lengths 8192 --steps 2
    python benchmarks/train_throughput.py --precision bf16-mixed --float32_matmul_precision medium
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --layers 6
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --layers 6 \
        --backend triton --configs "FAVOR+ causal" --lengths 131072 --longest --no_loader

``--backend`` picks FAVOR+'s kernels (PerformerConfig.attention_backend; auto: Triton on CUDA).
``--longest`` then doubles L from the largest of ``--lengths``, one fresh process per length,
until a step fails (out of memory) or ``--longest_budget_s`` is spent, and reports the longest L
that trained, with its tokens/s and peak memory.

Targets (CPU): at L = 8,192 the Performer step at most 1.5x (bidirectional) / 1.7x
(causal) OPT's; at L = 32,768 at least 5x the tokens/s of exact attention and within 8 GB peak;
the loader at least 10x the tokens/s the model consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name -> (kernel, causal)
    "OPT (attention = V)": ("opt", False),
    "FAVOR+ bidirectional": ("softmax", False),
    "FAVOR+ causal": ("softmax", True),
    "exact bidirectional": ("exact", False),
    "exact causal": ("exact", True),
}
SHARED_PROTEOMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteomes"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _tune_allocator() -> None:
    """The same process-level settings (allocator, flush-to-zero) for every contender."""
    try:
        from protperf.runtime import tune_process
    except ImportError:
        return
    tune_process()


def _return_values_module():
    """OPT: attention replaced by the identity on V (keeps FastAttention's call signature)."""
    from torch import nn

    class ReturnValues(nn.Module):
        def forward(self, q, k, v, key_padding_mask=None):
            return v

    return ReturnValues()


def random_batch(batch: int, length: int, causal: bool):
    """(inputs, targets), each (batch, length) int64: random residues (seed 0), next tokens for a
    causal model, 15% of the positions masked and predicted for a masked one."""
    import torch

    from protperf.tokenizer import FIRST_RESIDUE_ID, MASK, VOCAB_SIZE

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(FIRST_RESIDUE_ID, VOCAB_SIZE, (batch, length + 1), generator=generator)
    if causal:
        return tokens[:, :-1], tokens[:, 1:]
    inputs = tokens[:, :-1].clone()
    selected = torch.rand(inputs.shape, generator=generator) < 0.15
    targets = torch.where(selected, inputs, -100)
    inputs[selected] = MASK
    return inputs, targets


def worker(args: argparse.Namespace) -> dict:
    """Time training steps of one configuration; returns the measurements as a dict."""
    _tune_allocator()
    import torch

    from protperf.model import PerformerConfig, PerformerLM

    torch.set_float32_matmul_precision(args.float32_matmul_precision)  # as protperf train
    kernel, causal = CONFIGS[args.config]
    config = PerformerConfig(
        dim=args.dim,
        depth=args.layers,
        heads=args.heads,
        ff_dim=args.ff_dim,
        max_length=args.length,
        kernel="softmax" if kernel == "opt" else kernel,
        num_features=args.num_features,
        causal=causal,
        dropout=0.1,
        gradient_checkpointing=args.gradient_checkpointing,
        attention_backend=args.backend,
    )
    device = torch.device(args.device)
    model = PerformerLM(config).to(device)
    if kernel == "opt":
        for block in model.blocks:
            block.attn.attention = _return_values_module()
    if args.compile:  # as protperf train --compile: in place, the warm-up steps compile
        model.compile()
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    inputs, targets = (t.to(device) for t in random_batch(args.batch, args.length, causal))
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"
    )

    def step() -> float:
        start = time.perf_counter()
        with autocast:
            loss = model(inputs, targets=targets)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = [step() for _ in range(args.warmup)]  # with --compile, the first one compiles
    times, deadline = [], time.perf_counter() + args.budget_s
    while len(times) < args.steps and (not times or time.perf_counter() < deadline):
        times.append(step())
    step_s = min(times)  # best of the timed steps: robust to other processes on a shared CPU
    result = {
        "config": args.config,
        "length": args.length,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.length / step_s,
        "steps": len(times),
        "first_step_s": warmup[0] if warmup else None,
        "peak_rss_gb": _peak_rss_gb(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return result


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def _write_concat_file(out: Path, length: int, chunks: int) -> Path:
    """train.h5 with real proteome sequences (or random residues) as concat chunks."""
    import gzip

    import h5py
    import numpy as np

    from protperf.tokenizer import EOS, encode

    need = length * chunks
    parts, total = [], 0
    for fasta in sorted(SHARED_PROTEOMES.glob("*.fasta.gz")):
        with gzip.open(fasta, "rt") as handle:
            sequence: list[str] = []
            for line in handle:
                if line.startswith(">"):
                    if sequence:
                        parts.append(np.append(encode("".join(sequence)), np.uint8(EOS)))
                        total += len(parts[-1])
                    sequence = []
                    if total >= need:
                        break
                else:
                    sequence.append(line.strip())
        if total >= need:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    if len(stream) < need:  # no shared data: random residues with an <eos> every ~350
        rng = np.random.default_rng(0)
        stream = rng.integers(5, 30, need, dtype=np.uint8)
        stream[rng.random(need) < 1 / 350] = EOS
    concat = stream[:need].reshape(chunks, length)
    path = out / "train.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.zeros(0, np.uint8))
        f.create_dataset("offsets", data=np.zeros(1, np.int64))
        f.create_dataset("concat", data=concat, chunks=(1, length))
        f.attrs.update(split="train", num_sequences=0, num_tokens=0, concat_length=length)
    return path


def measure_loader_throughput(data: Path | None, length: int, batch: int, workers: int) -> dict:
    from protperf.data.datamodule import LoaderConfig, ProteinDataModule, measure_loader

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = Path(tmp)
            _write_concat_file(data, length, chunks=256)
        module = ProteinDataModule(
            data,
            concat=True,
            max_length=length,
            loader=LoaderConfig(batch_size=batch, num_workers=workers),
        )
        result = measure_loader(module.train_dataloader(), batches=100)
    return {"tokens_per_s": result.tokens_per_s, "batches_per_s": result.batches_per_s}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _run_one(args: argparse.Namespace, config: str, length: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--config", config, "--length", str(length),
        "--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads),
        "--ff_dim", str(args.ff_dim), "--num_features", str(args.num_features), "--batch", str(args.batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--budget_s", str(args.budget_s),
        "--device", args.device, "--precision", args.precision,
        "--float32_matmul_precision", args.float32_matmul_precision, "--backend", args.backend,
    ]  # fmt: skip
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    if args.compile:
        command.append("--compile")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "length": length, "error": f"timeout {args.timeout}s"}
    if done.returncode != 0:
        reason = (
            "killed (out of memory?)"
            if done.returncode < 0
            else done.stderr.strip().splitlines()[-1:]
        )
        return {"config": config, "length": length, "error": str(reason)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def longest(args: argparse.Namespace, results: dict) -> None:
    """Double L from the largest of --lengths for each configuration until a step fails or the
    budget is spent; print the longest that trained."""
    deadline = time.perf_counter() + args.longest_budget_s
    start = max(args.lengths)
    for config in args.configs:
        best = results.get((config, start))
        best = best if best and "error" not in best else None
        length = start * 2
        while time.perf_counter() < deadline:
            result = _run_one(args, config, length)
            print(f"#   longest {config:<22} L={length:<8} {json.dumps(result)}", flush=True)
            if "error" in result:
                break
            best, length = result, length * 2
        if best is None:
            print(f"longest {config}: none trained from L = {start:,}", flush=True)
            continue
        memory = best.get("peak_gpu_gb", best["peak_rss_gb"])
        print(
            f"longest {config}: L = {best['length']:,} trains, {best['tokens_per_s']:.0f} "
            f"tokens/s, {best['step_s']:.2f} s per step, peak memory {memory:.1f} GB; "
            f"L = {length:,} did not ({'budget spent' if time.perf_counter() >= deadline else 'failed'})",
            flush=True,
        )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "   - "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ff_dim", type=int, default=2048)
    parser.add_argument("--num_features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the best counts)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--budget_s", type=float, default=240, help="stop timing after this (>= 1 step)"
    )
    parser.add_argument("--timeout", type=float, default=1500, help="per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--float32_matmul_precision",
        default="high",
        choices=["highest", "high", "medium"],
        help="as protperf train's (high: TF32 on CUDA, IEEE float32 on CPUs)",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="FAVOR+'s kernels (auto: Triton on CUDA when installed, else PyTorch)",
    )
    parser.add_argument(
        "--longest", action="store_true", help="then double L until a step fails (see above)"
    )
    parser.add_argument("--longest_budget_s", type=float, default=300, help="for --longest")
    parser.add_argument(
        "--no_loader", action="store_true", help="skip the data loader's measurement"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (warm-up steps compile)"
    )
    parser.add_argument("--data", type=Path, default=None, help="prepared data with concat chunks")
    parser.add_argument("--loader_workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}, "
        f"{args.precision}, float32 matmul {args.float32_matmul_precision}; model: {args.layers} layers, d {args.dim}, {args.heads} heads, "
        f"d_ff {args.ff_dim}, m {args.num_features}, batch {args.batch}, "
        f"FAVOR+ backend {args.backend}, "
        f"{'gradient checkpointing, ' if args.gradient_checkpointing else ''}"
        f"{'torch.compile' if args.compile else 'eager'}",
        flush=True,
    )
    results: dict[tuple[str, int], dict] = {}
    for length in args.lengths:
        for config in args.configs:
            result = _run_one(args, config, length)
            results[config, length] = result
            print(f"#   {config:<22} L={length:<6} {json.dumps(result)}", flush=True)

    cuda = args.device.startswith("cuda")  # GPU steps take milliseconds: more digits, GPU memory
    gpu_column = f" {'peak GPU GB':>11}" if cuda else ""
    header = f"{'L':>6}  {'attention':<22} {'step s':>8} {'tokens/s':>9} {'peak RSS GB':>11}{gpu_column}  {'time vs OPT':>11}  {'tok/s vs exact':>14}"
    print("\n" + header + "\n" + "-" * len(header))
    for length in args.lengths:
        opt = results.get(("OPT (attention = V)", length), {})
        for config in args.configs:
            result = results[config, length]
            if "error" in result:
                print(f"{length:>6}  {config:<22} {result['error']}")
                continue
            direction = "causal" if "causal" in config else "bidirectional"
            exact = results.get((f"exact {direction}", length), {})
            vs_opt = _ratio(result["step_s"], opt.get("step_s")) if "OPT" not in config else ""
            vs_exact = (
                _ratio(result["tokens_per_s"], exact.get("tokens_per_s"))
                if "FAVOR" in config
                else ""
            )
            step = f"{result['step_s']:>8.4f}" if cuda else f"{result['step_s']:>8.2f}"
            gpu = f" {result.get('peak_gpu_gb', float('nan')):>11.2f}" if cuda else ""
            print(
                f"{length:>6}  {config:<22} {step} {result['tokens_per_s']:>9.0f} "
                f"{result['peak_rss_gb']:>11.2f}{gpu}  {vs_opt:>11}  {vs_exact:>14}"
            )

    if args.longest:
        longest(args, results)
    if args.no_loader:
        return 0
    length = 8192 if 8192 in args.lengths else args.lengths[0]
    loader = measure_loader_throughput(args.data, length, args.batch, args.loader_workers)
    consumed = max(
        (results.get((c, length), {}).get("tokens_per_s", 0.0) for c in CONFIGS if "FAVOR" in c),
        default=0.0,
    )
    print(
        f"\nloader alone (concat, L={length}, batch {args.batch}, {args.loader_workers} workers): "
        f"{loader['tokens_per_s']:.0f} tokens/s, {loader['batches_per_s']:.1f} batches/s"
        + (
            f" = {loader['tokens_per_s'] / consumed:.0f}x what the fastest FAVOR+ model consumes"
            if consumed
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
