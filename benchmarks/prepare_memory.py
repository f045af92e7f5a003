"""Peak memory of prepare-data's dataset builder at TrEMBL's record count (139 M records).

``prepare-data`` streams the download, so memory does not grow with the bytes read; it grows
with the number of records, through the per-record arrays of the dedupe / split / shuffle pass
(:class:`protperf.data.build.DatasetBuilder`). Parsing real flat files at TrEMBL's size takes
hours, so this feeds the builder synthetic record batches directly (random residues, 12-19 long,
so that each record costs the spill little disk and no two are equal; one record in 1,000
held out) and measures, each point in a fresh process, the peak RSS after the records are added
(pass 1) and after ``finish`` (dedupe, split, HDF5 files, concat chunks).

Short records fill concat buckets by their record cap (``bucket_records``) long before their
token cap (``bucket_tokens``, 256 M tokens); real TrEMBL records (353 residues on average) fill
them by tokens. The ``full bucket`` row measures that case: one bucket of real-length records
holding 256 M tokens, so that the peak at TrEMBL is about the 139 M-record row plus what the
full bucket adds over short records.

    python benchmarks/prepare_memory.py                     # 139 M and 35 M records + full bucket
    python benchmarks/prepare_memory.py --records 4000000   # a quick look

Disk: about 80 bytes per short record under ``--workdir`` (11 GB at 139 M), deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TREMBL_RECORDS = 139_394_261  # UniProt TrEMBL 2019_01 (the paper's release)
TREMBL_MEAN_LENGTH = 353
# Batches as the FASTA reader's: 16 M residues, or fewer records than that (flat-file batches
# are smaller still: 8 MB of text).
BATCH_RESIDUES = 16 << 20
BATCH_RECORDS = 50_000


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(records: int, low: int, high: int, workdir: Path) -> dict:
    """Add ``records`` synthetic records of ``low``..``high - 1`` residues, then finish."""
    from protperf.data.build import DatasetBuilder
    from protperf.data.records import RecordBatch
    from protperf.runtime import tune_process

    tune_process(runs_models=False)  # the allocator settings `protperf prepare-data` runs with
    rng = np.random.default_rng(0)
    base = _peak_mb()
    builder = DatasetBuilder(workdir / "spill")
    batch = min(BATCH_RECORDS, BATCH_RESIDUES // high)
    start = time.perf_counter()
    for first in range(0, records, batch):
        count = min(batch, records - first)
        lengths = rng.integers(low, high, count).astype(np.int64)
        held = np.zeros(count, dtype=bool)
        held[::1000] = True
        builder.add(
            RecordBatch(
                accessions=[b"A%010d" % i for i in range(first, first + count)],
                tokens=rng.integers(5, 25, int(lengths.sum()), dtype=np.uint8),
                lengths=lengths,
                held_out=held,
            )
        )
    added, add_peak = time.perf_counter(), _peak_mb()
    stats = builder.finish(workdir)
    return {
        "records": records,
        "tokens": builder.tokens,
        "base_mb": base,
        "add_peak_mb": add_peak,
        "finish_peak_mb": _peak_mb(),
        "add_s": added - start,
        "finish_s": time.perf_counter() - added,
        "duplicates": stats["duplicates_dropped"],
    }


def run_point(records: int, low: int, high: int, workdir: Path) -> dict:
    """:func:`measure` in a fresh process (its own peak RSS), files under ``workdir``."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        output = subprocess.run(
            [sys.executable, __file__, "--point", str(records), str(low), str(high),
             "--workdir", str(workdir)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=TREMBL_RECORDS, help="largest point")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/protperf-memory"))
    parser.add_argument("--point", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(*args.point, args.workdir)))
        return
    bucket_records = (256 << 20) // (TREMBL_MEAN_LENGTH + 1)
    points = [
        ("short records", args.records // 4, 12, 20),
        ("short records", args.records, 12, 20),
        ("full bucket (real lengths)", bucket_records, 300, 407),
    ]
    results = []
    for label, records, low, high in points:
        print(f"{label}: {records:,} records ...", file=sys.stderr, flush=True)
        results.append((label, run_point(records, low, high, args.workdir)))
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print("| records | kind | tokens | peak after add (MB) | peak after finish (MB) "
          "| finish bytes/record | add (s) | finish (s) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, row in results:
        per_record = (row["finish_peak_mb"] - row["base_mb"]) * 2**20 / row["records"]
        print(
            f"| {row['records']:,} | {label} | {row['tokens']:,} | {row['add_peak_mb']:,.0f} "
            f"| {row['finish_peak_mb']:,.0f} | {per_record:.1f} | {row['add_s']:.0f} "
            f"| {row['finish_s']:.0f} |"
        )
    (_, small), (_, large), (_, bucket) = results
    slope = (large["finish_peak_mb"] - small["finish_peak_mb"]) / (
        large["records"] - small["records"]
    )
    short_bucket = small["finish_peak_mb"] - small["records"] * slope  # the fixed part
    extra = max(0.0, bucket["finish_peak_mb"] - bucket["records"] * slope - short_bucket)
    trembl = large["finish_peak_mb"] + (TREMBL_RECORDS - large["records"]) * slope + extra
    print(
        f"\nSlope {slope * 2**20:.1f} bytes/record between the two short-record points; a full "
        f"bucket of real-length records adds {extra:,.0f} MB; TrEMBL 2019_01 "
        f"({TREMBL_RECORDS:,} records): about {trembl / 1024:.1f} GB peak."
    )


if __name__ == "__main__":
    main()
