"""Streaming `protperf embed` against the in-memory embed it replaced: peak memory as the input
grows 10x, and throughput.

Inputs are real proteins: the shared proteomes, concatenated, and repeated (ids suffixed, so
that they stay unique) up to the largest size asked for; each size is the first N proteins.
Each measurement is one `protperf embed` process, one intra-op thread, measured from the outside:
its peak resident memory (``VmHWM``) and its wall time from start to exit (reading,
checking, embedding and writing, all included). The peer is protperf as it was before streaming
(``--baseline-ref``, extracted with ``git archive``), which reads the whole FASTA file into memory
and holds every mean until it writes them. Both run the same model on the same files.

Targets: the streaming peak memory flat (the 10x input within 1.1x of the small one's), and
its throughput at least 0.9x the peer's.

    python benchmarks/embed_scale.py                         # tiny model, 20k and 200k proteins
    python benchmarks/embed_scale.py --model performer-small-uni --proteins 5000
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_PROTEOMES = REPO.parent / "shared" / "data" / "proteomes"
#: The last protperf before streaming embed: the peer.
DEFAULT_BASELINE = "08476d5"
#: Run first in each measured process: at exit, write its peak resident memory (kB) to
#: $PEAK_FILE. VmHWM belongs to the process's own address space; ``ru_maxrss`` would not do, as
#: Linux counts in it the parent's memory at the fork before ``exec``.
REPORT_PEAK = (
    "import atexit, os, re, sys; atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w')"
    ".write(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))); "
)
#: The tiny model's shape: the smallest that runs every part of the model, so that reading,
#: checking and writing weigh as much as they can against the embedding itself.
TINY = {"dim": 32, "depth": 2, "heads": 2, "ff_dim": 64, "num_features": 16, "max_length": 1024}


def write_inputs(folder: Path, sizes: list[int]) -> dict[int, Path]:
    """A plain FASTA file of the first N real proteins for each N in ``sizes``."""
    records: list[str] = []
    for path in sorted(SHARED_PROTEOMES.glob("*.fasta.gz")):
        with gzip.open(path, "rt") as handle:
            records.extend(">" + record for record in handle.read().split(">")[1:])
    if not records:
        sys.exit(f"no proteomes under {SHARED_PROTEOMES}")
    needed, rounds = max(sizes), 0
    pool = list(records)
    while len(pool) < needed:
        rounds += 1
        pool.extend(f">r{rounds}_{record[1:]}" for record in records)
    inputs = {}
    for size in sizes:
        inputs[size] = folder / f"proteins-{size}.fasta"
        inputs[size].write_text("".join(pool[:size]))
    return inputs


def tiny_model(folder: Path) -> Path:
    import torch

    from protperf.export import export_model
    from protperf.model import PerformerConfig, PerformerLM

    torch.manual_seed(0)
    return export_model(PerformerLM(PerformerConfig(causal=True, **TINY)), folder,
                        mode="unidirectional")  # fmt: skip


def baseline_tree(ref: str, folder: Path) -> Path:
    """The protperf package at ``ref``, extracted from git into ``folder``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "protperf"],
                             check=True, capture_output=True).stdout  # fmt: skip
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(folder, filter="data")
    return folder


def measure(code: Path, fasta: Path, model: str, out: Path, tokens_per_batch: int) -> dict:
    """One `protperf embed` process (the package under ``code``): wall seconds, peak RSS (MB)."""
    out.unlink(missing_ok=True)
    command = [sys.executable, "-c", REPORT_PEAK + "from protperf.cli import main; sys.exit(main())",
               "embed", str(fasta), "--model", model, "-o", str(out),
               "--tokens-per-batch", str(tokens_per_batch)]  # fmt: skip
    peak = out.with_suffix(".peak")
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "PEAK_FILE": str(peak),
           # protperf's setting for embed (protperf.runtime.no_primitive_cache), given to the
           # peer too: the memory compared is that of holding the file, not oneDNN's cache.
           "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=out.parent)  # fmt: skip
    stderr = process.stderr.read()
    status = process.wait()
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"embed failed under {code}:\n{stderr.decode()[-2000:]}")
    return {"seconds": seconds, "rss_mb": int(peak.read_text()) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proteins", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--model", help="a protperf model (default: a tiny random one)")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE)
    args = parser.parse_args()

    import h5py

    with tempfile.TemporaryDirectory(prefix="embed-scale-") as tmp:
        root = Path(tmp)
        model = args.model or str(tiny_model(root / "tiny-model"))
        inputs = write_inputs(root, args.proteins)
        codes = {"streaming": REPO, "in-memory": baseline_tree(args.baseline_ref, root / "base")}
        rows = []
        for size, fasta in inputs.items():
            result = {}
            for name, code in codes.items():
                out = root / f"{name}-{size}.h5"
                result[name] = measure(code, fasta, model, out, args.tokens_per_batch)
                with h5py.File(out) as f:
                    result[name]["residues"] = int(f.attrs["num_residues"])
                    result[name]["proteins"] = len(f["ids"])
                print(f"{size:,} proteins, {name}: {result[name]}", file=sys.stderr, flush=True)
            rows.append((size, result))

    first = rows[0][1]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread "
          f"a process; model: {args.model or 'tiny random ' + str(TINY)}; peer: protperf at "
          f"{args.baseline_ref}\n")  # fmt: skip
    print("| proteins | residues | peak RSS, streaming (MB) | peak RSS, in-memory (MB) | "
          "residues/s, streaming | residues/s, in-memory | throughput ratio |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size, result in rows:
        stream, memory = result["streaming"], result["in-memory"]
        rate = {k: v["residues"] / v["seconds"] for k, v in result.items()}
        print(f"| {size:,} | {stream['residues']:,} | {stream['rss_mb']:,.0f} | "
              f"{memory['rss_mb']:,.0f} | {rate['streaming']:,.0f} | {rate['in-memory']:,.0f} | "
              f"{rate['streaming'] / rate['in-memory']:.2f}x |")  # fmt: skip
    if len(rows) > 1:
        last = rows[-1][1]
        growth = {k: last[k]["rss_mb"] / first[k]["rss_mb"] for k in last}
        print(f"\npeak RSS growth from {rows[0][0]:,} to {rows[-1][0]:,} proteins: streaming "
              f"{growth['streaming']:.2f}x, in-memory {growth['in-memory']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
