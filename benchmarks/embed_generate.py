"""Inference benchmark of `protperf embed` and `protperf generate`, one model, one run.

The model (by default the paper's concat shape: 6 layers, d 512, 8 heads, d_ff 2048, m = 256;
random weights, which cost the same as trained ones) is measured for:

1. embedding throughput (residues/s) on a seeded sample of a real proteome, batched by
   `protperf embed`'s token budget, with FAVOR+ and with exact attention (the same weights, only
   the attention kernel differs);
2. memory of embedding one protein of 2k, 8k and 32k residues, one process per measurement:
   the peak RSS of the `protperf embed` command itself (what a user needs), and the embedding's
   working memory, the peak above what the process held with the model loaded and warmed up
   (measured in a worker whose allocations of 1 MB and more are mmap'ed, so that RSS follows
   the live tensors, with the kernel's high-water mark reset just before the forward pass);
3. generation speed (tokens/s, batch 1, sampling included) at positions 1k and 8k: FAVOR+'s
   recurrence (softmax and ReLU features) against what Transformers decode with, a key/value
   cache: protperf's exact attention and Hugging Face's GPT-2 of the same shape (random
   weights; ``--no-gpt2`` without transformers); and the memory of FAVOR+'s constant state
   against the cache's. Re-running the full forward pass for every token is a last row, for
   scale only: nobody decodes that way.

Targets: memory linear in the length (32k at most 4.5x the 8k memory, checked on the
working memory; the command's total is dominated by the fixed cost of torch and the weights);
the 8k generation rate at least 0.8x the 1k rate.

    python benchmarks/embed_generate.py                 # the table in docs/benchmarks.md
    python benchmarks/embed_generate.py --layers 2 --dim 256 --heads 4 --ff-dim 1024 --sample 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SHARED_PROTEOMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteomes"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def random_protein(length: int, seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(AMINO_ACIDS), size=length))


def proteome_sample(path: Path, size: int, seed: int) -> list[str]:
    """``size`` proteins drawn without replacement (seeded) from a proteome FASTA."""
    import numpy as np

    from protperf.fasta import read_fasta

    records, _ = read_fasta(path, skip_invalid=True)
    picks = np.random.default_rng(seed).choice(
        len(records), size=min(size, len(records)), replace=False
    )
    return [records[i].sequence for i in sorted(picks.tolist())]


def with_kernel(model, kernel: str, *, causal: bool | None = None):
    """The same weights with another attention kernel (and/or causality)."""
    from protperf.model import PerformerLM

    config = replace(
        model.config, kernel=kernel, causal=model.config.causal if causal is None else causal
    )
    other = PerformerLM(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("attention.projection")}
    missing, unexpected = other.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attention.projection") for k in missing)
    if kernel == model.config.kernel:
        other.load_state_dict(model.state_dict())
    return other


def embedding_throughput(model, sequences, tokens_per_batch: int) -> tuple[float, float]:
    """(residues/s, seconds) of embedding ``sequences`` (mean of the last layer)."""
    import torch

    from protperf.embed import embed_tokens
    from protperf.tokenizer import encode

    encoded = [encode(s) for s in sequences]
    layers = [model.config.depth]
    # Warm-up: thread pools, allocator, kernels.
    list(embed_tokens(model, encoded[:4], layers=layers, tokens_per_batch=tokens_per_batch))
    torch.manual_seed(0)
    start = time.perf_counter()
    for _ in embed_tokens(model, encoded, layers=layers, tokens_per_batch=tokens_per_batch):
        pass
    seconds = time.perf_counter() - start
    return sum(len(s) for s in encoded) / seconds, seconds


def embed_peak_rss(model_dir: Path, length: int, workdir: Path) -> float:
    """Peak RSS (MB) of `protperf embed` run on one random protein of ``length`` residues."""
    fasta = workdir / f"protein-{length}.fasta"
    fasta.write_text(f">protein_{length}\n{random_protein(length, seed=length)}\n")
    out = workdir / f"protein-{length}.h5"
    command = [sys.executable, "-m", "protperf.cli", "embed", str(fasta), "--model", str(model_dir)]
    process = subprocess.Popen(
        [*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # The child's own high-water mark, read while it runs: wait4's ru_maxrss starts from this
    # process's RSS at the fork, whatever the child then uses.
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            peak = max(peak, int(next(x for x in status if x.startswith("VmHWM:")).split()[1]))
        time.sleep(0.05)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"protperf embed failed on {length} residues:\n{stderr}")
    return peak / 1024  # KiB -> MiB


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":")))


def working_memory_worker(args: argparse.Namespace) -> None:
    """Worker: print the peak memory (MB) above the loaded model of embedding one protein."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: RSS follows live tensors
    from protperf.embed import embed_tokens
    from protperf.tokenizer import encode

    model = build_model(args)
    layers = [model.config.depth]
    list(embed_tokens(model, [encode(random_protein(64, 0))], layers=layers))  # warm-up
    sequence = encode(random_protein(args.worker_memory, seed=args.worker_memory))
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the RSS now
    for _ in embed_tokens(model, [sequence], layers=layers, tokens_per_batch=4096):
        pass
    print(f"{(_status_kib('VmHWM') - before) / 1024:.1f}")


def working_memory(args: argparse.Namespace, length: int) -> float:
    """Run :func:`working_memory_worker` in a fresh process; returns MB."""
    command = [sys.executable, __file__, "--worker-memory", str(length)]
    for name in ("layers", "dim", "heads", "ff_dim", "num_features"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed on {length} residues:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def build_model(args: argparse.Namespace):
    """The benchmark's model (bidirectional FAVOR+, random weights from seed 0), eval mode."""
    import torch

    from protperf.model import PerformerConfig, PerformerLM

    torch.manual_seed(0)
    config = PerformerConfig(
        dim=args.dim, depth=args.layers, heads=args.heads, ff_dim=args.ff_dim,
        num_features=args.num_features, dropout=0.0, max_length=1024,
    )  # fmt: skip
    return PerformerLM(config).eval()


def _prompt(length: int, seed: int):
    """<bos> and ``length`` random residues, (length + 1,) int64."""
    import torch

    from protperf.tokenizer import BOS, encode

    residues = torch.from_numpy(encode(random_protein(length, seed)).astype("int64"))
    return torch.cat([torch.tensor([BOS]), residues])


def state_bytes(states) -> int:
    """Bytes of protperf's decoding states: FAVOR+'s sums, or exact attention's key/value cache."""
    tensors = [t for s in states for t in (s.attention.context, s.attention.value_sum,
                                           s.attention.key_max, s.recent_values)]  # fmt: skip
    return sum(t.nbytes for t in tensors if t is not None)


def decoding_rate(model, positions: list[int], steps: int, seed: int = 0) -> dict[int, tuple]:
    """{position: (tokens/s, state bytes)} of generation (decode step + sampling, batch 1).

    The model is driven through the prefix one token at a time, exactly as a prompt is fed;
    ``steps`` generated tokens are timed from each position, and the state (or cache) measured
    at that position.
    """
    import torch

    from protperf.generate import restrict_logits, sample_next

    tokens = _prompt(max(positions) + steps, seed)
    generator = [torch.Generator().manual_seed(seed)]
    allow_eos = torch.tensor([False])
    rates: dict[int, tuple] = {}
    states, position = None, 0
    for target in sorted(positions):
        while position < target:  # feed the prompt up to the measured position
            _, states = model.decode_step(tokens[position : position + 1], states, position)
            position += 1
        size = state_bytes(states)
        start = time.perf_counter()
        token = tokens[position : position + 1]
        for _ in range(steps):
            logits, states = model.decode_step(token, states, position)
            token = sample_next(restrict_logits(logits, allow_eos), generator)
            position += 1
        rates[target] = (steps / (time.perf_counter() - start), size)
    return rates


def gpt2_decoding_rate(config, positions: list[int], steps: int, seed: int = 0) -> dict:
    """{position: (tokens/s, cache bytes)} of Hugging Face's GPT-2 of ``config``'s shape
    (random weights), decoding with its key/value cache after a prefill of the prompt."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from protperf.generate import restrict_logits, sample_next
    from protperf.tokenizer import VOCAB_SIZE

    logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=max(positions) + steps + 1, n_embd=config.dim,
        n_layer=config.depth, n_head=config.heads, n_inner=config.ff_dim, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )).eval()  # fmt: skip
    tokens = _prompt(max(positions) + steps, seed)
    generator = [torch.Generator().manual_seed(seed)]
    allow_eos = torch.tensor([False])
    rates = {}
    with torch.no_grad():
        for target in sorted(positions):
            out = gpt2(tokens[None, :target], use_cache=True)
            cache = out.cache
            size = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            token = tokens[target : target + 1]
            start = time.perf_counter()
            for _ in range(steps):
                out = gpt2(token[None], cache=cache, use_cache=True)
                cache = out.cache
                token = sample_next(restrict_logits(out.logits[:, -1], allow_eos), generator)
            rates[target] = (steps / (time.perf_counter() - start), size)
    return rates


def full_forward_rate(model, positions: list[int], repeats: int = 2) -> dict[int, float]:
    """tokens/s when every new token re-runs the causal forward over the whole prefix."""
    import torch

    from protperf.tokenizer import BOS, encode

    rates = {}
    for position in positions:
        tokens = torch.from_numpy(encode(random_protein(position, 1)).astype("int64"))
        tokens = torch.cat([torch.tensor([BOS]), tokens])[None]
        times = []
        with torch.no_grad():
            model(tokens)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                model(tokens)
                times.append(time.perf_counter() - start)
        rates[position] = 1.0 / statistics.median(times)
    return rates


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ff-dim", type=int, default=2048)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument(
        "--proteome", type=Path, default=SHARED_PROTEOMES / "UP000000625-E.coli.fasta.gz"
    )
    parser.add_argument("--sample", type=int, default=256, help="proteins in the throughput sample")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--steps", type=int, default=128, help="timed tokens per position")
    parser.add_argument("--gpt2", action=argparse.BooleanOptionalAction, default=True,
                        help="decode with Hugging Face's GPT-2 too (needs transformers)")  # fmt: skip
    parser.add_argument("--worker-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_memory is not None:
        working_memory_worker(args)
        return 0

    from protperf.runtime import tune_process

    tune_process()  # as the protperf command does, before torch is imported
    import torch

    from protperf.export import export_model

    if not args.proteome.exists():
        print(f"proteome not found: {args.proteome} (see ../shared/data)", file=sys.stderr)
        return 1
    favor = build_model(args)
    config = favor.config
    exact = with_kernel(favor, "exact")
    shape = (
        f"{config.depth} layers, d {config.dim}, {config.heads} heads, d_ff {config.ff_dim}, "
        f"m {config.num_features}, {favor.num_parameters() / 1e6:.1f} M parameters"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"model: {shape} (random weights)\n")
    results: list[tuple[str, ...]] = [("measurement", "FAVOR+", "baseline", "ratio", "target")]

    # 1. Embedding throughput on the proteome sample.
    sequences = proteome_sample(args.proteome, args.sample, seed=0)
    residues = sum(len(s) for s in sequences)
    favor_rate, favor_s = embedding_throughput(favor, sequences, args.tokens_per_batch)
    exact_rate, exact_s = embedding_throughput(exact, sequences, args.tokens_per_batch)
    print(f"embedding sample: {len(sequences)} proteins of {args.proteome.name}, {residues:,} "
          f"residues (median {statistics.median(len(s) for s in sequences):.0f}); "
          f"FAVOR+ {favor_s:.1f} s, exact {exact_s:.1f} s")  # fmt: skip
    results.append((
        "embed throughput, proteome sample (residues/s)", f"{favor_rate:,.0f}",
        f"{exact_rate:,.0f} (exact attention)", f"{favor_rate / exact_rate:.2f}x", "report",
    ))  # fmt: skip

    # 2. Memory of embedding one long protein (a process each).
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = export_model(favor, workdir / "model", mode="bidirectional")
        fixed = embed_peak_rss(model_dir, 64, workdir)
        peaks = {
            length: embed_peak_rss(model_dir, length, workdir) for length in args.memory_lengths
        }
    working = {length: working_memory(args, length) for length in args.memory_lengths}
    print(f"protperf embed peak RSS on a 64-residue protein (fixed cost): {fixed:,.0f} MB")
    for length in args.memory_lengths:
        results.append((
            f"embed one {length:,}-residue protein: working memory (command's peak RSS), MB",
            f"{working[length]:,.0f} ({peaks[length]:,.0f})", "", "", "",
        ))  # fmt: skip
    if 8192 in peaks and 32768 in peaks:
        results.append((
            "memory 32k / 8k: working memory (command's peak RSS)",
            f"{working[32768] / working[8192]:.2f}x ({peaks[32768] / peaks[8192]:.2f}x)",
            "", "", "<= 4.5x",
        ))  # fmt: skip

    # 3. Generation: FAVOR+'s recurrence against key/value caches (and a full forward per token).
    decoders = {
        "FAVOR+ softmax": with_kernel(favor, "softmax", causal=True),
        "FAVOR+ ReLU": with_kernel(favor, "relu", causal=True),
        "exact, KV cache": with_kernel(favor, "exact", causal=True),
    }
    start = time.perf_counter()
    rates = {name: decoding_rate(model, args.positions, args.steps)
             for name, model in decoders.items()}  # fmt: skip
    if args.gpt2:
        rates["GPT-2 (Hugging Face), KV cache"] = gpt2_decoding_rate(
            config, args.positions, args.steps
        )
    decode_s = time.perf_counter() - start
    forward = full_forward_rate(decoders["FAVOR+ softmax"], args.positions)
    print(f"generation: {args.steps} tokens timed at each position, batch 1, sampling included "
          f"(prompts fed token by token; GPT-2 prefilled: {decode_s:.0f} s in all)\n")  # fmt: skip
    caches = [name for name in rates if "KV cache" in name]
    for position in args.positions:
        favor_rate, favor_bytes = rates["FAVOR+ softmax"][position]
        relu_rate, _ = rates["FAVOR+ ReLU"][position]
        peers = ", ".join(f"{rates[n][position][0]:,.1f} ({n})" for n in caches)
        best = max(rates[n][position][0] for n in caches)
        results.append((
            f"generate at position {position:,}, tokens/s: softmax (ReLU)",
            f"{favor_rate:,.1f} ({relu_rate:,.1f})", peers, f"{favor_rate / best:.2f}x", "",
        ))  # fmt: skip
        cache_bytes = rates["exact, KV cache"][position][1]
        results.append((
            f"decoding state at position {position:,}, MB", f"{favor_bytes / 2**20:,.2f}",
            f"{cache_bytes / 2**20:,.1f} (KV cache)", f"{favor_bytes / cache_bytes:.3f}x", "",
        ))  # fmt: skip
    first, last = min(args.positions), max(args.positions)
    results.append((
        f"generation rate {last:,} / {first:,}",
        f"{rates['FAVOR+ softmax'][last][0] / rates['FAVOR+ softmax'][first][0]:.2f}x",
        f"{rates['exact, KV cache'][last][0] / rates['exact, KV cache'][first][0]:.2f}x "
        "(exact, KV cache)", "", ">= 0.8x",
    ))  # fmt: skip
    results.append((
        f"full forward per token at {first:,} / {last:,}, tokens/s (scale only)",
        "", f"{forward[first]:,.2f} / {forward[last]:,.2f}", "", "",
    ))  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
