"""``protperf prepare-data``: a UniProt release (or your FASTA / flat files) -> tokenized HDF5."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from protperf import __version__
from protperf.commandline import run_verb
from protperf.data.errors import DataError
from protperf.data.paper import (
    PAPER_OOD_FAMILIES,
    PAPER_RELEASE,
    PAPER_TEST_FRACTION,
    PAPER_VALID_FRACTION,
    SPLITS,
)
from protperf.data.publish import DATA_DIR, MANIFEST, StagingDir, check_output
from protperf.data.sources import Source, open_source
from protperf.data.stream import is_url
from protperf.data.uniprot import resolve_release
from protperf.durable import recover_folder, reporting_full_disk

#: Environment variable naming the default UniProt mirror (an institution's, or a test server).
MIRROR_VARIABLE = "PROTPERF_UNIPROT_MIRROR"

# numpy, h5py and tokenizers (protperf.data.build / records, protperf.tokenizer) are imported
# once the download is running: their import time then overlaps with it.


def prepare_data(
    release: str | None = None,
    out: Path | None = None,
    mirror: str | None = None,
    source: list[str] | None = None,
    ood_source: list[str] | None = None,
    pfam_map: str | None = None,
    max_sequences: int | None = None,
    concat_length: int = 8192,
    ood_families: list[str] | None = None,
    ood_families_file: Path | None = None,
    valid_fraction: float = PAPER_VALID_FRACTION,
    test_fraction: float = PAPER_TEST_FRACTION,
    seed: int = 0,
    keep_download: Path | None = None,
    compression: Literal["none", "lzf", "gzip"] = "none",
    overwrite: bool = False,
    retries: int = 8,
    retry_wait: float = 1.0,
    quiet: bool = False,
) -> dict:
    """Download a UniProt release (or read FASTA / flat files) into tokenized HDF5 datasets.

    Streams TrEMBL's flat file out of the release archive while it downloads (HTTP -> gunzip ->
    tar -> uniprot_trembl.dat.gz -> gunzip -> records), drops exact duplicate sequences, puts
    every sequence with a held-out Pfam family in `ood` and splits the rest into train / valid /
    test by a hash of the sequence, and writes <out>/{train,valid,test,ood}.h5, tokenizer.json
    and manifest.json. The folder appears only when complete (built in <out>.partial); a run
    that was killed is started over. Example: protperf prepare-data --release 2019_01

    Args:
        release: UniProt release: 'current' or YYYY_MM (default 2019_01, the paper's). With
            --source it only names the dataset (default 'custom').
        out: Output folder (default data/<release>).
        mirror: uniprot, ebi, expasy, or the base URL of a mirror's databases/uniprot/ folder
            (default: $PROTPERF_UNIPROT_MIRROR, else uniprot).
        source: Read these instead of a release: local paths or URLs of UniProt flat files
            (.dat), FASTA, gzipped or not, or a knowledgebase tar.gz. Several: --source a b.
        ood_source: Sources read like --source whose every record goes to ood: hold out whole
            organisms (a sequence also found in another source is kept once, in ood).
        pfam_map: For FASTA sources: a file or URL mapping accessions to Pfam families (first
            column the accession, PF ids anywhere on the line; gzip allowed) for the OOD split.
        max_sequences: Stop after this many records (a quick sample; the md5 is not checked).
        concat_length: Length of the rows of the concat datasets.
        ood_families: Held-out Pfam families (default: the paper's 20). --ood-families none
            disables the OOD split.
        ood_families_file: A file with held-out Pfam ids (PF00001 ...), instead of --ood-families.
        valid_fraction: Fraction of unique non-OOD sequences in valid (paper: 102,400 of 106 M).
        test_fraction: Fraction in test (paper: 1,033,216 of 106 M).
        seed: Seed of the shuffled order of the concat datasets (splits do not depend on it).
        keep_download: Also save the downloaded archive in this folder; a later run reads it
            from there (or resumes it if it was cut off).
        compression: HDF5 filter for tokens and concat: none (default, fastest reads), lzf, gzip.
        overwrite: Replace an existing prepared dataset in --out.
        retries: Attempts per dropped connection before giving up.
        retry_wait: Seconds before the first retry (doubling each time, at most 60).
        quiet: No progress bar and no summary.

    Returns the manifest (also written to <out>/manifest.json); prints a summary unless quiet.
    """
    started = time.perf_counter()
    _check_settings(valid_fraction, test_fraction, concat_length, max_sequences)
    families = _held_out_families(ood_families, ood_families_file)
    with _short_gil_switch_interval():
        sources: list[dict] = []
        if ood_source and not source:
            raise DataError("--ood-source needs --source (the sources to split)")
        if source:
            label = release or "custom"
            # Held-out sources first: a sequence they share with another source stays in ood.
            inputs = [{"spec": spec, "held_out": True} for spec in ood_source or []]
            inputs += [{"spec": spec} for spec in source]
        else:
            archive = resolve_release(
                release or PAPER_RELEASE,
                mirror or os.environ.get(MIRROR_VARIABLE, "uniprot"),
                retries=retries,
                retry_wait=retry_wait,
            )
            label = archive.release
            inputs = [
                {
                    "spec": archive.url,
                    "size": archive.size,
                    "md5": archive.md5,
                    "member": archive.member,
                }
            ]
        out = Path(out) if out is not None else DATA_DIR / label
        recover_folder(out)  # an earlier output a killed --overwrite run had moved aside
        check_output(out, overwrite=overwrite)
        held_out_accessions: set[str] = set()
        if pfam_map:
            held_out_accessions = _read_pfam_map(pfam_map, families, retries, retry_wait)

        stage = StagingDir(out, overwrite=overwrite)
        with reporting_full_disk(out), stage as staging:
            builder = progress = tokenizer_json = None
            try:
                for item in inputs:
                    left = None if max_sequences is None else max_sequences - _count(builder)
                    if left == 0:
                        break
                    source = open_source(
                        item["spec"], size=item.get("size"), md5=item.get("md5"),
                        member=item.get("member"), keep_download=keep_download,
                        retries=retries, retry_wait=retry_wait,
                    )  # fmt: skip
                    try:
                        if builder is None:  # heavy imports, while the download starts
                            tokenizer_json = _Background(
                                _save_tokenizer_json, staging / "tokenizer.json"
                            )
                            from protperf.data.build import DatasetBuilder

                            builder = DatasetBuilder(
                                staging / "spill",
                                valid_fraction=valid_fraction,
                                test_fraction=test_fraction,
                                concat_length=concat_length,
                                seed=seed,
                                compression=compression,
                            )
                            progress = _progress(inputs, quiet)
                        entry = _read_source(
                            source, builder, families, held_out_accessions, left, progress,
                            held_out=item.get("held_out", False),
                        )  # fmt: skip
                    finally:
                        source.close()
                    sources.append(entry)
            finally:
                if progress is not None:
                    progress.close()
                if tokenizer_json is not None:
                    # Its file is in staging: finished before an error deletes staging, or it
                    # could write into the folder while it is being removed and leave it behind.
                    tokenizer_json.finished()
            if builder is None:  # no input was opened
                from protperf.data.build import DatasetBuilder

                builder = DatasetBuilder(staging / "spill", concat_length=concat_length)
            stats = builder.finish(staging)
            if tokenizer_json is None:
                tokenizer_json = _Background(_save_tokenizer_json, staging / "tokenizer.json")
            tokenizer_json.wait()
            manifest = {
                "release": label,
                "protperf_version": __version__,
                "sources": sources,
                "held_out_pfam_families": families,
                "valid_fraction": valid_fraction,
                "test_fraction": test_fraction,
                "concat_length": concat_length,
                "seed": seed,
                "compression": compression,
                "max_sequences": max_sequences,
                "files": {name: f"{name}.h5" for name in SPLITS},
                **stats,
                "elapsed_seconds": round(time.perf_counter() - started, 2),
            }
            (staging / "spill").rmdir()
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last
            stage.publish()
    for warning in _empty_split_warnings(manifest):
        print(f"protperf prepare-data: warning: {warning}", file=sys.stderr)
    if not quiet:
        print(_summary(manifest, out))
    return manifest


def _check_settings(
    valid_fraction: float, test_fraction: float, concat_length: int, max_sequences: int | None
) -> None:
    """Raise :class:`DataError` for settings that cannot work, before anything is downloaded."""
    for option, value in (("--valid-fraction", valid_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:  # NaN too
            raise DataError(f"{option} must be between 0 and 1, not {value}")
    if valid_fraction + test_fraction > 1.0:
        raise DataError(
            f"--valid-fraction {valid_fraction} and --test-fraction {test_fraction} add up to "
            "more than 1"
        )
    if concat_length < 1:
        raise DataError(f"--concat-length must be at least 1, not {concat_length}")
    if max_sequences is not None and max_sequences < 1:
        raise DataError(f"--max-sequences must be at least 1, not {max_sequences}")


def _empty_split_warnings(manifest: dict) -> list[str]:
    """Why valid or test came out empty although its fraction is positive (too few sequences
    for the fraction: each sequence lands in a split by its hash)."""
    warnings = []
    splits = manifest["splits"]
    candidates = manifest["unique_sequences"] - splits["ood"]["sequences"]  # OOD is not split
    for split in ("valid", "test"):
        fraction = manifest[f"{split}_fraction"]
        if fraction > 0 and splits[split]["sequences"] == 0:
            warnings.append(
                f"the {split} split is empty: {candidates:,} sequences to split and "
                f"--{split}-fraction {fraction:g} expect {candidates * fraction:.2g} in it; "
                f"give more sequences or a larger --{split}-fraction"
            )
    return warnings


@contextlib.contextmanager
def _short_gil_switch_interval(seconds: float = 0.00003) -> Iterator[None]:
    """Decompression threads need the GIL back after each C call; with Python's default 5 ms
    switch interval they would wait that long for the parsing thread every time, so the
    interval is made as short as the parsing thread's own work between releases."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _count(builder) -> int:
    return 0 if builder is None else builder.records


def _save_tokenizer_json(path: Path) -> None:
    from protperf import tokenizer

    tokenizer.save_tokenizer_json(path)


class _Background:
    """Runs ``function(*args)`` in a thread; :meth:`wait` re-raises its exception."""

    def __init__(self, function, *args) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                function(*args)
            except BaseException as error:  # handed to wait()
                self._error = error

        self._thread = threading.Thread(target=run, name="protperf-background", daemon=True)
        self._thread.start()

    def finished(self) -> None:
        """Wait for the thread to end; its exception, if any, is kept for :meth:`wait`."""
        self._thread.join()

    def wait(self) -> None:
        self.finished()
        if self._error is not None:
            raise self._error


def _read_source(
    source: Source,
    builder,  # protperf.data.build.DatasetBuilder (imported late: see the imports above)
    families: list[str],
    held_out_accessions: set[str],
    left: int | None,
    progress,
    *,
    held_out: bool = False,
) -> dict:
    """Feed an opened source's records to the builder; returns its manifest entry.

    ``held_out``: every record goes to ood (a source given with ``--ood-source``).
    """
    from protperf.data.records import iter_batches

    reported, before, opened = 0, builder.records, time.perf_counter()
    for batch in iter_batches(
        source.chunks,
        source=source.name,
        held_out_families=families,
        held_out_accessions=held_out_accessions,
        max_records=left,
    ):
        if held_out:
            batch.held_out[:] = True
        builder.add(batch)
        progress.update(source.meter.bytes - reported)
        reported = source.meter.bytes
        rate = (builder.records - before) / max(time.perf_counter() - opened, 1e-9)
        progress.set_postfix_str(
            f"{builder.records:,} records, {rate:,.0f} records/s", refresh=False
        )
    if left is not None and builder.records - before >= left:
        return {**source.entry(verified=False), "ood": held_out}  # stopped early: no md5 check
    for _ in source.chunks:  # whatever follows the records (rest of the tar) counts for md5
        pass
    progress.update(source.meter.bytes - reported)
    return {**source.verify(), "ood": held_out}


class _NoProgress:
    def update(self, *args) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(inputs: list[dict], quiet: bool):
    if quiet:
        return _NoProgress()
    from tqdm import tqdm

    sizes = [
        item.get("size") if is_url(item["spec"]) or not Path(item["spec"]).is_file()
        else Path(item["spec"]).stat().st_size
        for item in inputs
    ]  # fmt: skip
    total = sum(sizes) if all(size is not None for size in sizes) else None
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, desc="prepare-data", dynamic_ncols=True, smoothing=0.1,
    )  # fmt: skip


def _held_out_families(families: list[str] | None, path: Path | None) -> list[str]:
    if families is not None and path is not None:
        raise DataError("give --ood-families or --ood-families-file, not both")
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise DataError(f"{path}: cannot read ({error.strerror})") from error
        found = re.findall(r"\bPF\d{5}\b", text)
        if not found:
            raise DataError(f"{path}: no Pfam ids (PF00001 ...) in the file")
        return sorted(set(found))
    if families is None:
        return list(PAPER_OOD_FAMILIES)
    names = [name for entry in families for name in re.split(r"[\s,]+", entry) if name]
    if [name.lower() for name in names] == ["none"]:
        return []
    bad = [name for name in names if not re.fullmatch(r"PF\d{5}", name)]
    if bad:
        raise DataError(f"not Pfam family ids: {bad} (expected PF followed by 5 digits)")
    return sorted(set(names))


def _read_pfam_map(spec: str, families: list[str], retries: int, retry_wait: float) -> set[str]:
    import io

    from protperf.data.records import load_held_out_accessions
    from protperf.data.stream import ChunkReader

    source = open_source(spec, retries=retries, retry_wait=retry_wait)
    try:
        text = io.TextIOWrapper(io.BufferedReader(ChunkReader(source.chunks)), encoding="latin-1")
        return load_held_out_accessions(text, families)
    finally:
        source.close()


def main(argv: list[str]) -> int:
    """``protperf prepare-data``: parse ``argv`` and prepare; returns the exit status."""
    return run_verb(prepare_data, argv, prog="protperf prepare-data")


def _summary(manifest: dict, folder: Path) -> str:
    lines = [
        f"wrote {folder}/ ({manifest['elapsed_seconds']:.1f} s): "
        f"{manifest['records_read']:,} records, {manifest['unique_sequences']:,} unique, "
        f"{manifest['duplicates_dropped']:,} duplicates dropped, "
        f"{manifest['unknown_residues_mapped_to_x']:,} unknown residues mapped to X"
    ]
    for name in SPLITS:
        split = manifest["splits"][name]
        lines.append(
            f"  {name:<5} {split['sequences']:>12,} sequences {split['tokens']:>15,} tokens "
            f"{split['concat_chunks']:>10,} concat chunks"
        )
    return "\n".join(lines)
