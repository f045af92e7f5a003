"""Benchmark ``protperf prepare-data`` against ``gzip -dc`` and Biopython's SwissProt parser.

Builds a UniProt flat file of at least ``--size-mb`` MB (uncompressed) from the real records in
../shared/data/uniprot-dat (drawn at random, each sequence given 10% random substitutions and a
new accession so that no two are duplicates), gzips it (``gzip -6``), packs it as TrEMBL inside a
``knowledgebase2019_01.tar.gz`` release served by tests/uniprot_server.py on 127.0.0.1, and
times in one run:

- ``gzip -dc file.dat.gz > /dev/null`` (the baseline);
- isal's igzip in Python (decompression alone: the floor for any gzip reader here);
- Biopython's ``SwissProt.parse`` on the first ``--biopython-mb`` MB, extrapolated linearly to
  the whole file (it is far too slow to run on all of it);
- ``protperf prepare-data --release 2019_01 --mirror http://127.0.0.1:...`` end to end (HTTP,
  md5, gunzip, tar, gunzip, parse, dedupe, split, HDF5), in a subprocess, with its peak RSS.

All speeds are MB of *uncompressed* flat file per second. Files go under ``--workdir`` (default
/tmp/protperf-bench), never into the repository. Run it alone: ``flock -x`` the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "uniprot-dat"
sys.path.insert(0, str(REPO / "tests"))

from uniprot_server import build_release_tree  # noqa: E402

# Paper facts (TrEMBL, January 2019).
TREMBL_RECORDS = 139_394_261
TREMBL_MEAN_LENGTH = 353
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def real_records() -> list[tuple[bytes, bytes, bytes]]:
    """(header lines, SQ line, residues) of every record in the shared flat files."""
    records = []
    for path in sorted(SHARED.glob("*.dat")):
        for text in path.read_bytes().split(b"\n//\n"):
            text = text.strip(b"\n")
            if not text:
                continue
            sq = text.index(b"\nSQ   ")
            line_end = text.index(b"\n", sq + 1)
            residues = text[line_end + 1 :].translate(None, b" \n")
            records.append((text[: sq + 1], text[sq + 1 : line_end + 1], residues))
    return records


def sequence_lines(residues: bytes) -> bytes:
    lines = []
    for start in range(0, len(residues), 60):
        line = residues[start : start + 60]
        lines.append(b"     " + b" ".join(line[i : i + 10] for i in range(0, len(line), 10)))
    return b"\n".join(lines) + b"\n"


def make_flat_file(folder: Path, size_mb: float, slice_mb: float, seed: int = 0) -> dict:
    """Write ``flat.dat.gz`` (>= size_mb MB uncompressed) and ``slice.dat`` (the first records)."""
    meta_path = folder / "flat.json"
    wanted = {"size_mb": size_mb, "slice_mb": slice_mb, "seed": seed, "version": 2}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("wanted") == wanted:
        return json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    records = real_records()
    rng = np.random.default_rng(seed)
    target, slice_target = int(size_mb * 1e6), int(slice_mb * 1e6)
    written = count = residues_total = 0
    gz = folder / "flat.dat.gz"
    with (
        open(gz, "wb") as out,
        subprocess.Popen(["gzip", "-6", "-c"], stdin=subprocess.PIPE, stdout=out) as gzipper,
        open(folder / "slice.dat", "wb") as slice_file,
    ):
        pending: list[bytes] = []
        while written < target:
            header, sq, residues = records[rng.integers(len(records))]
            sequence = np.frombuffer(residues, dtype=np.uint8).copy()
            changed = rng.random(len(sequence)) < 0.10
            sequence[changed] = AMINO[rng.integers(0, 20, int(changed.sum()))]
            accession = b"B%09d" % count
            header = re.sub(
                rb"^AC   [^;]+;", b"AC   " + accession + b";", header, count=1, flags=re.M
            )
            record = header + sq + sequence_lines(sequence.tobytes()) + b"//\n"
            pending.append(record)
            if written < slice_target:
                slice_file.write(record)
            written += len(record)
            residues_total += len(sequence)
            count += 1
            if len(pending) >= 2000:
                gzipper.stdin.write(b"".join(pending))
                pending = []
        gzipper.stdin.write(b"".join(pending))
        gzipper.stdin.close()
    meta = {
        "wanted": wanted,
        "bytes": written,
        "records": count,
        "residues": residues_total,
        "gz_bytes": gz.stat().st_size,
        "slice_bytes": (folder / "slice.dat").stat().st_size,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def trembl_header_bytes() -> float:
    """Mean bytes per record outside the sequence lines, over the shared TrEMBL records."""
    data = (SHARED / "emboss_trembl.dat").read_bytes()
    records = [r for r in data.split(b"\n//\n") if r.strip()]
    sequence_bytes = sum(len(r[r.index(b"\n", r.index(b"\nSQ   ") + 1) :]) for r in records)
    return (len(data) - sequence_bytes) / len(records)


def time_gzip(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["gzip", "-dc", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def time_isal(path: Path) -> float:
    from isal import igzip_lib

    start = time.perf_counter()
    decompressor = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            decompressor.decompress(chunk)
    return time.perf_counter() - start


def time_biopython(path: Path) -> tuple[float, int]:
    from Bio import SwissProt

    start = time.perf_counter()
    with open(path) as handle:
        count = sum(1 for _ in SwissProt.parse(handle))
    return time.perf_counter() - start, count


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "uniprot_server.py"), str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    url = server.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1"):
        server.kill()
        raise RuntimeError(f"the mirror did not start: {url!r}")
    return server, url


def time_prepare(url: str, out: Path) -> tuple[float, int, dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "protperf.cli", "prepare-data", "--release", "2019_01",
               "--mirror", url, "--out", str(out), "--quiet"]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"prepare-data failed with status {process.returncode}")
    manifest = json.loads((out / "manifest.json").read_text())
    return elapsed, usage.ru_maxrss * 1024, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=512.0, help="uncompressed MB (>= 500)")
    parser.add_argument("--biopython-mb", type=float, default=40.0, help="slice for Biopython")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (best kept)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/protperf-bench"))
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"skipped: real protein data not found at {SHARED}")
    work = args.workdir
    print(f"building a {args.size_mb:.0f} MB flat file under {work} ...", file=sys.stderr)
    meta = make_flat_file(work / "input", args.size_mb, args.biopython_mb)
    mirror = work / "mirror"
    if not (mirror / "built").exists():
        shutil.rmtree(mirror, ignore_errors=True)
        build_release_tree(mirror, work / "input" / "flat.dat.gz")
        (mirror / "built").write_text("ok")
    server, url = start_server(mirror)
    gz = work / "input" / "flat.dat.gz"
    gzip_runs, isal_runs, runs = [], [], []
    try:
        bio_s, bio_records = time_biopython(work / "input" / "slice.dat")
        for _ in range(args.repeats):  # interleaved, so that a noisy moment hits all alike
            gzip_runs.append(time_gzip(gz))
            isal_runs.append(time_isal(gz))
            runs.append(time_prepare(url, work / "out"))
    finally:
        server.kill()
        server.wait()
    gzip_s, isal_s = min(gzip_runs), min(isal_runs)
    prepare_s, rss, manifest = min(runs, key=lambda run: run[0])
    assert manifest["records_read"] == meta["records"], "prepare-data missed records"

    mb = meta["bytes"] / 1e6
    bio_mbps = meta["slice_bytes"] / 1e6 / bio_s
    bio_rps = bio_records / bio_s
    rows = [
        ("gzip -dc > /dev/null", gzip_s, mb / gzip_s, meta["records"] / gzip_s, None),
        ("isal igzip (decompress only)", isal_s, mb / isal_s, meta["records"] / isal_s, None),
        (f"Biopython SwissProt.parse ({meta['slice_bytes'] / 1e6:.0f} MB slice, extrapolated)",
         mb / bio_mbps, bio_mbps, bio_rps, None),
        ("protperf prepare-data, end to end over HTTP", prepare_s, mb / prepare_s,
         meta["records"] / prepare_s, rss),
    ]  # fmt: skip
    print()
    print(
        f"Input: {mb:,.0f} MB flat file ({meta['records']:,} records, "
        f"{meta['residues'] / 1e6:,.1f} M residues), {meta['gz_bytes'] / 1e6:,.0f} MB gzipped "
        f"(ratio {meta['bytes'] / meta['gz_bytes']:.2f}). Best of {len(runs)} interleaved runs: "
        f"gzip -dc {', '.join(f'{t:.2f}' for t in gzip_runs)} s; isal "
        f"{', '.join(f'{t:.2f}' for t in isal_runs)} s; prepare-data "
        f"{', '.join(f'{run[0]:.2f}' for run in runs)} s"
    )
    print()
    print("| reader | time (s) | MB/s | records/s | vs gzip -dc | vs Biopython | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, mbps, rps, memory in rows:
        print(
            f"| {name} | {seconds:,.2f} | {mbps:,.0f} | {rps:,.0f} | "
            f"{(mb / seconds) / (mb / gzip_s):.2f}x | {mbps / bio_mbps:.1f}x | "
            f"{'' if memory is None else f'{memory / 2**20:,.0f} MiB'} |"
        )
    mbps = mb / prepare_s
    rps = meta["records"] / prepare_s
    header = trembl_header_bytes()
    trembl_bytes = TREMBL_RECORDS * (header + TREMBL_MEAN_LENGTH * 71 / 60)
    print()
    print("Projection for TrEMBL 2019_01 (139,394,261 records, mean length 353: paper facts).")
    print(
        f"Assumed flat-file size: {trembl_bytes / 1e9:,.0f} GB = records x ({header:,.0f} bytes "
        "of header lines per record, the mean of the shared TrEMBL records, + 353 x 71/60 bytes "
        "of sequence lines)."
    )
    print(
        f"- by bytes, at {mbps:,.0f} MB/s: {trembl_bytes / 1e6 / mbps / 60:,.0f} min"
        f" (if the network delivers {mbps / (meta['bytes'] / meta['gz_bytes']):,.0f} MB/s of"
        " compressed archive; slower links make the download the bound)"
    )
    print(
        f"- by records, at {rps:,.0f} records/s: {TREMBL_RECORDS / rps / 60:,.0f} min (pessimistic:"
        f" the benchmark's records average {meta['bytes'] / meta['records']:,.0f} bytes, mostly"
        " Swiss-Prot-sized)"
    )


if __name__ == "__main__":
    main()
