"""Shards of a long ``protperf embed`` run: a plan cut by tokens, a resumable folder, a merge.

The plan (:func:`plan_shards`) cuts the FASTA file, in file order, into shards of about
``shard_tokens`` tokens each (a protein longer than that is a shard of its own); it depends on the
file and ``shard_tokens`` alone, so any number of processes computes the same numbers for every
protein. Each shard is written whole to ``<out>.shards/shard-NNNNNN.h5`` (renamed into place when
complete) in the layout of the final file; a run started again with the same arguments keeps the
shards already there. :func:`merge_shards` concatenates them in file order into the output and
removes the folder. ``run.json`` in the folder records the arguments, so that shards of a
different run are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from protperf.durable import (
    atomic_file,
    check_writes,
    h5_file,
    recover_folder,
    remove_stale_temporaries,
    reporting_full_disk,
    sync_tree,
)
from protperf.errors import InputError
from protperf.fasta import FastaRecord, SkippedRecord, scan_fasta

if TYPE_CHECKING:
    import torch

#: Tokens a shard holds by default (residues plus <bos>/<eos> per protein): a few seconds of a
#: GPU, so that little is lost to a kill, and few enough files for tens of millions of proteins.
DEFAULT_SHARD_TOKENS = 1 << 20
#: Rows of per-residue embeddings copied at a time by the merge (bounds its memory).
MERGE_ROWS = 1 << 16
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Shard:
    """A run of consecutive FASTA records, from the one at byte ``offset`` (record number
    ``first``, 1-based): ``records`` in all, of which ``proteins`` are embedded (the others were
    skipped as invalid), with ``residues`` residues."""

    index: int
    offset: int
    first: int
    records: int
    proteins: int
    residues: int

    @property
    def tokens(self) -> int:
        return self.residues + 2 * self.proteins

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.h5"


@dataclass(frozen=True)
class Longest:
    """The longest protein of a file: its record number, id and residues."""

    number: int = 0
    id: str = ""
    length: int = 0


@dataclass
class Plan:
    """The shards of a FASTA file, in file order, the records skipped as invalid, and the
    longest protein."""

    shards: list[Shard]
    skipped: list[SkippedRecord] = field(default_factory=list)
    longest: Longest = field(default_factory=Longest)

    @property
    def proteins(self) -> int:
        return sum(shard.proteins for shard in self.shards)

    @property
    def residues(self) -> int:
        return sum(shard.residues for shard in self.shards)


def plan_shards(
    fasta: Path, *, shard_tokens: int = DEFAULT_SHARD_TOKENS, skip_invalid: bool = False
) -> Plan:
    """Validate ``fasta`` in one streaming pass and cut it into shards of at most
    ``shard_tokens`` tokens (a longer protein alone). Memory: the shards' numbers, the skipped
    records and 8 bytes per id (:func:`protperf.fasta.scan_fasta`, which raises
    :class:`~protperf.fasta.FastaError` for an invalid file).
    """
    plan = Plan([])
    current: dict[str, int] | None = None
    for item in scan_fasta(fasta, skip_invalid=skip_invalid):
        length = len(item.record.sequence) if item.record is not None else 0
        if item.record is None:
            plan.skipped.append(item.skipped)
        elif (
            current
            and current["proteins"]
            and (current["residues"] + 2 * current["proteins"] + length + 2 > shard_tokens)
        ):
            plan.shards.append(Shard(index=len(plan.shards), **current))
            current = None
        if current is None:
            current = {"offset": item.offset, "first": item.number, "records": 0,
                       "proteins": 0, "residues": 0}  # fmt: skip
        current["records"] += 1
        if item.record is not None:
            current["proteins"] += 1
            current["residues"] += length
            if length > plan.longest.length:
                plan.longest = Longest(item.number, item.record.id, length)
    if current is not None:
        plan.shards.append(Shard(index=len(plan.shards), **current))
    return plan


def assign_shards(shards: Sequence[Shard], world_size: int) -> list[list[Shard]]:
    """Each rank's shards (in file order), balanced by tokens: every shard, in order, goes to
    the rank with the fewest tokens so far (the lowest rank on a tie)."""
    shares: list[list[Shard]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for shard in shards:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(shard)
        loads[rank] += shard.tokens
    return shares


def shard_folder(out: Path) -> Path:
    """``<out>.shards`` beside the output file."""
    return out.with_name(f"{out.name}.shards")


def run_digest(key: dict[str, object]) -> str:
    """A short fingerprint of a run's arguments, stamped on each of its shard files."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def open_shard_folder(folder: Path, key: dict[str, object], *, overwrite: bool) -> None:
    """Make ``folder`` ready for the run described by ``key`` (JSON-able): create it, or keep it
    when it holds shards of the same run; shards of a different run are an :class:`InputError`
    unless ``overwrite``, which discards them."""
    key = json.loads(json.dumps(key))
    recover_folder(folder)  # a staging folder left by a run killed while creating it
    if folder.exists():
        run_file = folder / RUN_FILE
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == key:
            remove_stale_temporaries(folder)
            return
        if not overwrite:
            if isinstance(previous, dict):
                changed = sorted(k for k in key.keys() | previous.keys()
                                 if key.get(k) != previous.get(k))  # fmt: skip
                why = f"shards of a run with a different {', '.join(changed)}"
            else:
                why = f"not a shard folder of protperf embed (no readable {RUN_FILE})"
            raise InputError(f"{folder}: {why}; pass --overwrite to discard it")
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with reporting_full_disk(folder):
            staging.mkdir()
            (staging / RUN_FILE).write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
            sync_tree(staging)
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def discard_if_empty(folder: Path) -> None:
    """Remove a shard folder that holds no finished shard (a run stopped before its first):
    there is nothing in it to resume."""
    if folder.is_dir() and not any(folder.glob("shard-*.h5")):
        shutil.rmtree(folder, ignore_errors=True)


def finished_shards(folder: Path, shards: Sequence[Shard], digest: str) -> set[int]:
    """Indices of the shards already written whole for this run (stamped with ``digest`` and
    holding the planned proteins); a file that does not check out is deleted, to be redone."""
    import h5py

    done: set[int] = set()
    for shard in shards:
        path = folder / shard.name
        if not path.exists():
            continue
        try:
            with h5py.File(path, "r") as f:
                good = f.attrs.get("run") == digest and len(f["ids"]) == shard.proteins
        except (OSError, KeyError):
            good = False
        if good:
            done.add(shard.index)
        else:
            path.unlink()
    return done


def write_shard(
    out: Path,
    records: Sequence[FastaRecord],
    items: Iterator[tuple[int, torch.Tensor, torch.Tensor | None]],
    *,
    dim: int,
    num_layers: int,
    per_residue: bool,
    attrs: dict[str, object],
    progress: object | None = None,
    overwrite: bool = True,
) -> None:
    """Write a shard's proteins in the layout of :mod:`protperf.embed`'s output, from
    :func:`protperf.embed.embed_tokens`'s items (index into ``records``, mean (K, D), residues
    (L_i, K, D) or None), which may come in any order; ``progress.update`` gets the residues.

    The file is written as ``.<name>.<pid>.tmp`` beside ``out`` and renamed onto ``out`` only
    when complete; on any error or interrupt the temporary file is removed. Without
    ``overwrite`` an ``out`` that appeared meanwhile is kept (an :class:`InputError`).
    """
    import h5py
    import numpy as np

    lengths = np.array([len(r.sequence) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    layer_axis = (num_layers,) if num_layers > 1 else ()
    means = np.zeros((len(records), *layer_axis, dim), dtype=np.float32)
    with atomic_file(out, overwrite=overwrite) as tmp, h5_file(tmp) as f:
        strings = h5py.string_dtype()
        f.create_dataset("ids", data=[r.id for r in records], dtype=strings)
        f.create_dataset("descriptions", data=[r.description for r in records], dtype=strings)
        residues_ds = None
        if per_residue:
            f.create_dataset("offsets", data=offsets)
            residues_ds = f.create_dataset(
                "residues", shape=(int(offsets[-1]), *layer_axis, dim), dtype=np.float32
            )
        seen = np.zeros(len(records), dtype=bool)
        for index, mean, residues in items:
            means[index] = mean.numpy().reshape(means.shape[1:])
            if residues_ds is not None and residues is not None:
                rows = residues.numpy().reshape(-1, *residues_ds.shape[1:])
                residues_ds[offsets[index] : offsets[index + 1]] = rows
            seen[index] = True
            check_writes(f)  # a full disk stops the shard at once
            if progress is not None:
                progress.update(int(lengths[index]))
        if not seen.all():
            raise RuntimeError(f"{int((~seen).sum())} proteins were not embedded")
        f.create_dataset("mean", data=means)
        f.attrs.update(attrs)


def merge_shards(
    folder: Path, plan: Plan, out: Path, *, attrs: dict[str, object], overwrite: bool
) -> None:
    """Concatenate the plan's shard files, in file order, into ``out`` (written atomically, the
    layout of :mod:`protperf.embed`), then delete ``folder``. Memory: one shard's means and
    ``MERGE_ROWS`` residues."""
    import h5py
    import numpy as np

    total = plan.proteins
    with atomic_file(out, overwrite=overwrite) as tmp, h5_file(tmp) as f:
        strings = h5py.string_dtype()
        row = residue = 0
        for shard in plan.shards:
            with h5py.File(folder / shard.name, "r") as part:
                if row == 0:
                    f.create_dataset("ids", shape=(total,), dtype=strings)
                    f.create_dataset("descriptions", shape=(total,), dtype=strings)
                    f.create_dataset("mean", shape=(total, *part["mean"].shape[1:]),
                                     dtype=np.float32)  # fmt: skip
                    if "residues" in part:
                        f.create_dataset("offsets", shape=(total + 1,), dtype=np.int64)
                        f.create_dataset("residues", shape=(plan.residues,
                                         *part["residues"].shape[1:]), dtype=np.float32)  # fmt: skip
                        f["offsets"][0] = 0
                end = row + shard.proteins
                for name in ("ids", "descriptions", "mean"):
                    f[name][row:end] = part[name][:]
                if "residues" in part:
                    f["offsets"][row + 1 : end + 1] = part["offsets"][1:] + residue
                    for start in range(0, shard.residues, MERGE_ROWS):
                        stop = min(start + MERGE_ROWS, shard.residues)
                        f["residues"][residue + start : residue + stop] = part["residues"][
                            start:stop
                        ]
                row, residue = end, residue + shard.residues
                check_writes(f)
        f.attrs.update(attrs)
    shutil.rmtree(folder)
