"""`protperf embed`: protein (and residue) embeddings of a FASTA file, in the manner of ESM's extract.

    protperf embed sequences.fasta [--model MODEL] [-o embeddings.h5] [--per-residue]
        [--layers -1 ...] [--tokens-per-batch N] [--device cpu|cuda] [--devices N]
        [--num-nodes K] [--shard-tokens N] [--precision 32|bf16-mixed] [--skip-invalid]
        [--overwrite]

Each protein is read as ``<bos> sequence <eos>``, whole: no cropping, whatever its length (FAVOR+
costs linear time and memory in the length). The file is validated in one streaming pass and cut
into shards of about ``--shard-tokens`` tokens (:mod:`protperf.shards`), which the processes
share by tokens and write to ``<out>.shards/``; rank 0 merges them in FASTA order. Memory is one
shard's, whatever the size of the file, and a stopped run resumes from the shards written.
Within a shard, proteins are batched by a token budget, longest first (ESM's scheme: a batch
takes proteins while count x longest stays within the budget; a protein longer than the budget
runs alone); the embedding of a protein does not depend on its batch (padding is masked out of
attention and the mean), and the shards do not depend on the number of processes.

Output HDF5 (written to a temporary name, renamed when complete), N proteins, D = model dim:

- ``ids`` (N strings): the FASTA ids (first word of the header), in FASTA order;
- ``descriptions`` (N strings): the full header lines;
- ``mean`` (float32, N x D): mean over the residues (``<bos>``, ``<eos>`` and padding excluded)
  of the requested layer's hidden states; with several ``--layers``, N x K x D with the layers
  along axis 1 in the order of the ``layers`` attribute;
- with ``--per-residue``: ``residues`` (float32, total_residues x D, or x K x D) and ``offsets``
  (int64, N+1): protein i's residues are ``residues[offsets[i]:offsets[i+1]]``;
- attributes: ``model`` (path given), ``model_id`` (sha256 of the weights), ``model_config``
  (JSON), ``mode``, ``layers`` (resolved, 0..depth), ``precision``,
  ``float32_matmul_precision``, ``protperf_version``, ``num_sequences``, ``num_residues``,
  ``skipped_ids``, ``fasta``.

Layers follow ESM: 0 is the token embedding, i the output of block i, and ``depth`` (also -1) the
final layer-normed states, the ones the LM head reads; negative values count from the end.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protperf import __version__, runtime
from protperf.commandline import INPUT_ERROR, run_verb
from protperf.durable import check_output_file
from protperf.errors import InputError
from protperf.fasta import FastaReader
from protperf.inference import (
    LoadedModel,
    Precision,
    autocast,
    load_for_inference,
    locate_model,
    weights_fingerprint,
)
from protperf.model import PerformerLM
from protperf.runtime import MatmulPrecision
from protperf.shards import (
    DEFAULT_SHARD_TOKENS,
    Plan,
    Shard,
    assign_shards,
    discard_if_empty,
    finished_shards,
    merge_shards,
    open_shard_folder,
    plan_shards,
    run_digest,
    shard_folder,
    write_shard,
)
from protperf.tokenizer import batch_encode, encode
from protperf.workers import Workers, start_workers

DEFAULT_TOKENS_PER_BATCH = 4096  # ESM extract's default
_FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fna", ".seq")


def resolve_layers(layers: Sequence[int], depth: int) -> list[int]:
    """ESM-style layer indices -> indices in [0, depth] (-1 -> depth); order kept, repeats dropped."""
    resolved: list[int] = []
    for layer in layers:
        index = layer + depth + 1 if layer < 0 else layer
        if not 0 <= index <= depth:
            raise InputError(
                f"--layers {layer}: this model has layers 0..{depth} (or -{depth + 1}..-1)"
            )
        if index not in resolved:
            resolved.append(index)
    if not resolved:
        raise InputError("--layers needs at least one layer")
    return resolved


def token_budget_batches(lengths: Sequence[int], tokens_per_batch: int) -> list[list[int]]:
    """Group indices into batches by a token budget, longest first (ESM's scheme).

    ``lengths`` are in tokens (with ``<bos>``/``<eos>``). Sequences are taken in decreasing
    length; a batch grows while (count x its longest) <= ``tokens_per_batch``; a sequence
    longer than the budget forms a batch of its own. Every index appears exactly once.
    """
    if tokens_per_batch <= 0:
        raise ValueError(f"tokens_per_batch must be positive, got {tokens_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Decreasing lengths: the batch's longest is its first sequence.
        if current and (len(current) + 1) * lengths[current[0]] > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def forward_batches(
    model: PerformerLM,
    lengths: Sequence[int],
    residues: Callable[[int], np.ndarray],
    *,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: torch.device | str = "cpu",
    precision: Precision = "32",
    repr_layers: Sequence[int] = (),
) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """The model over items batched by a token budget (:func:`token_budget_batches`), each read
    whole as ``<bos> residues <eos>``.

    Args:
        model: an eval-mode model on ``device``.
        lengths: residues in each item.
        residues: ``residues(i)``, item i's residue token ids (L_i,), asked for only when its
            batch runs (so that many items derived from one protein need not all be held).

    Yields:
        (the batch's item indices, longest first; the model's output for them: ``logits``
        (B, L_max + 2, V) and ``representations`` {layer: (B, L_max + 2, D)}).
    """
    device = torch.device(device)
    for batch in token_budget_batches([length + 2 for length in lengths], tokens_per_batch):
        tokens, padding_mask = batch_encode([residues(index) for index in batch])
        tokens = tokens.to(device)
        padding_mask = None if padding_mask is None else padding_mask.to(device)
        with autocast(device, precision):
            out = model(tokens, padding_mask, repr_layers=list(repr_layers))
        yield batch, out


@torch.no_grad()
def embed_tokens(
    model: PerformerLM,
    sequences: Sequence[np.ndarray],
    *,
    layers: Sequence[int],
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    per_residue: bool = False,
    device: torch.device | str = "cpu",
    precision: Precision = "32",
) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """Embed proteins batch by batch (in batch order, longest first).

    Args:
        model: an eval-mode model on ``device``.
        sequences: residue token ids of each protein (no special tokens), each (L_i,).
        layers: resolved layer indices (see :func:`resolve_layers`), K of them.

    Yields:
        (index into ``sequences``, mean (K, D) float32 on the CPU, residues (L_i, K, D) float32
        on the CPU or None without ``per_residue``).
    """
    batches = forward_batches(
        model, [len(s) for s in sequences], sequences.__getitem__,
        tokens_per_batch=tokens_per_batch, device=device, precision=precision, repr_layers=layers,
    )  # fmt: skip
    for batch, out in batches:
        hidden = torch.stack([out["representations"][layer] for layer in layers], dim=2)
        hidden = hidden.float()  # (B, L, K, D)
        for row, index in enumerate(batch):
            residues = hidden[row, 1 : len(sequences[index]) + 1]  # (L_i, K, D)
            mean = residues.mean(dim=0).cpu()
            yield index, mean, (residues.cpu() if per_residue else None)


def default_output(fasta: Path) -> Path:
    """``<fasta name without .gz and FASTA suffix>.h5`` in the current directory."""
    name = fasta.name
    if name.endswith(".gz"):
        name = name[:-3]
    stem = Path(name).stem if Path(name).suffix.lower() in _FASTA_SUFFIXES else name
    return Path(f"{stem}.h5")


def embed(
    fasta: Path,
    model: str | None = None,
    out: Path | None = None,
    per_residue: bool = False,
    layers: tuple[int, ...] = (-1,),
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: str = "cpu",
    devices: int = 1,
    num_nodes: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    precision: Precision = "32",
    float32_matmul_precision: MatmulPrecision = "high",
    skip_invalid: bool = False,
    overwrite: bool = False,
) -> Path:
    """Embed the proteins of a FASTA file with a protperf model into an HDF5 file.

    Writes the datasets ids, descriptions and mean (N x D float32, mean over residues), plus
    residues and offsets with --per-residue (the layout: docs/data.md), in FASTA order. Proteins
    are never cropped. The file is read in one streaming pass and embedded in shards of about
    --shard-tokens tokens, so memory does not grow with the file. --devices N (and --num-nodes)
    share the shards among processes by tokens (Lightning Fabric; torchrun and SLURM ranks are
    picked up as by train). Shards are kept in <out>.shards/ until the output is complete: a run
    that was stopped resumes when started again with the same arguments. An invalid input
    writes nothing, and an existing file is replaced only with --overwrite.

    Args:
        fasta: FASTA file (plain or gzipped); lower case accepted, a final '*' removed.
        model: a packaged model's name, a run folder, an export folder or a Lightning .ckpt
            (default: the most recent export under ./runs).
        out: output HDF5 (default: the FASTA name with .h5, in the current folder).
        per_residue: also store every residue's embedding (residues, offsets).
        layers: layers to return: 0 = token embedding, i = block i, -1 = final (layer-normed).
        tokens_per_batch: token budget of a batch (count x longest, with <bos>/<eos>).
        device: cpu, cuda or cuda:N; with --devices, the kind of device (cpu or cuda).
        devices: processes on this machine, one per device (CPU processes with --device cpu).
        num_nodes: machines, each running --devices processes (torchrun or SLURM starts them).
        shard_tokens: tokens in a shard, the unit of work shared among processes and of resuming;
            the numbers do not depend on --devices.
        precision: 32 (float32) or bf16-mixed / 16-mixed autocast; outputs are float32.
        float32_matmul_precision: float32 products: high = TF32 on CUDA (FAVOR+ computes in
            float32 even under autocast), highest = IEEE float32, medium = bfloat16 on
            CPUs with AMX too. A CPU gives the same numbers with high and highest.
        skip_invalid: skip (and report) records with no sequence or non-amino-acid letters.
        overwrite: replace an existing output file (and a shard folder of a different run).
    """
    start = time.perf_counter()
    runtime.no_primitive_cache()
    fasta = Path(fasta)
    out = Path(out) if out is not None else default_output(fasta)
    check_output_file(out, overwrite=overwrite)
    options = {"per_residue": per_residue, "tokens_per_batch": tokens_per_batch,
               "shard_tokens": shard_tokens, "precision": precision,
               "float32_matmul_precision": float32_matmul_precision,
               "skip_invalid": skip_invalid}  # fmt: skip
    for option, value in (
        ("--tokens-per-batch", tokens_per_batch),
        ("--shard-tokens", shard_tokens),
    ):
        if value <= 0:
            raise InputError(f"{option} must be positive, got {value}")
    folder = shard_folder(out)
    resume = f"the finished shards in {folder} are kept: run the same command again to resume"
    workers = start_workers(device, devices, num_nodes, prog="protperf embed", resume=resume)
    loaded: LoadedModel | None = None
    setup: _Setup | str = ""
    if workers.is_main:
        try:
            loaded, setup = _prepare(fasta, model, folder, workers, layers=layers,
                                     options=options, overwrite=overwrite)  # fmt: skip
        except InputError as error:
            setup = str(error)
    setup = workers.broadcast(setup)
    if isinstance(setup, str):
        workers.close()  # every rank has the news: leave together, or gloo aborts the exit
        if workers.is_main:
            raise InputError(setup)
        raise SystemExit(INPUT_ERROR)  # rank 0 reports it
    if loaded is None:  # the other ranks load the model rank 0 found
        loaded = load_for_inference(setup.model, workers.device)
    config, resolved, plan = loaded.config, setup.layers, setup.plan
    share = setup.shares[workers.rank]
    digest = run_digest(setup.key)
    try:
        with runtime.float32_matmul_precision(float32_matmul_precision):
            seconds = _embed_shards(loaded, fasta, folder, share, digest, layers=resolved,
                                    per_residue=per_residue, tokens_per_batch=tokens_per_batch,
                                    precision=precision, progress=workers.is_main)  # fmt: skip
    except BaseException:
        if workers.world_size == 1:
            discard_if_empty(folder)
        raise
    workers.barrier()
    if workers.is_main:
        attrs = {
            "model": str(loaded.path), "model_id": setup.key["model_id"],
            "model_config": json.dumps(config.to_dict()), "mode": loaded.mode,
            "layers": np.array(resolved, dtype=np.int64), "precision": precision,
            "float32_matmul_precision": float32_matmul_precision, "per_residue": per_residue,
            "protperf_version": __version__, "num_sequences": plan.proteins,
            "num_residues": plan.residues, "skipped_ids": [item.id for item in plan.skipped],
            "fasta": str(fasta),
        }  # fmt: skip
        merge_shards(folder, plan, out, attrs=attrs, overwrite=overwrite)
        done = sum(shard.residues for shard in share)
        processes = f" on {workers.world_size} processes" if workers.world_size > 1 else ""
        print(
            f"embedded {plan.proteins:,} proteins ({plan.residues:,} residues) with "
            f"{loaded.describe()}{processes}; this process: {done:,} residues in {seconds:.1f} s "
            f"({done / max(seconds, 1e-9):,.0f} residues/s); {time.perf_counter() - start:.1f} s "
            "in all"
            + (f"; resumed {setup.resumed} of {len(plan.shards)} shards" if setup.resumed else "")
            + (f"; skipped {len(plan.skipped)} invalid record(s)" if plan.skipped else ""),
            file=sys.stderr,
        )
        print(out)
    workers.close()
    return out


@dataclass
class _Setup:
    """What rank 0 found and tells the others: the model's path, the resolved layers, the
    plan, each rank's shards, how many were written already, and the run's arguments."""

    model: str
    layers: list[int]
    plan: Plan
    shares: list[list[Shard]]
    resumed: int
    key: dict[str, object]


def _prepare(
    fasta: Path,
    model: str | None,
    folder: Path,
    workers: Workers,
    *,
    layers: Sequence[int],
    options: dict[str, object],
    overwrite: bool,
) -> tuple[LoadedModel, _Setup]:
    """Rank 0's part: find the model, validate and plan the FASTA file (before the model is
    read), load the model, ready the shard folder and share out the shards not yet written."""
    path = locate_model(model)
    plan = plan_shards(fasta, shard_tokens=options["shard_tokens"],
                       skip_invalid=options["skip_invalid"])  # fmt: skip
    loaded = load_for_inference(path, workers.device)
    config = loaded.config
    resolved = resolve_layers(layers, config.depth)
    limit = config.length_limit
    if limit is not None and plan.longest.length > limit[0] - 2:
        raise InputError(
            f"{fasta}: record {plan.longest.number} ({plan.longest.id!r}) has "
            f"{plan.longest.length} residues; this model's {limit[1]} read at most {limit[0] - 2}"
        )
    for item in plan.skipped:
        print(f"skipped record {item.number} ({item.id!r}): {item.reason}", file=sys.stderr)
    stat = fasta.stat()
    key = {"fasta": str(fasta.resolve()), "fasta_bytes": stat.st_size,
           "fasta_mtime_ns": stat.st_mtime_ns, "model_id": weights_fingerprint(loaded.model),
           "layers": resolved, "device_type": workers.device.type,
           "protperf_version": __version__, **options}  # fmt: skip
    open_shard_folder(folder, key, overwrite=overwrite)
    done = finished_shards(folder, plan.shards, run_digest(key))
    missing = [shard for shard in plan.shards if shard.index not in done]
    shares = assign_shards(missing, workers.world_size)
    return loaded, _Setup(str(path), resolved, plan, shares, len(done), key)


def _embed_shards(
    loaded: LoadedModel,
    fasta: Path,
    folder: Path,
    shards: Sequence[Shard],
    digest: str,
    *,
    layers: Sequence[int],
    per_residue: bool,
    tokens_per_batch: int,
    precision: Precision,
    progress: bool,
) -> float:
    """Embed and write this process's shards, in file order; returns the seconds it took."""
    from tqdm import tqdm

    started = time.perf_counter()
    total = sum(shard.residues for shard in shards)
    with (
        FastaReader(fasta) as reader,
        tqdm(total=total, unit="res", unit_scale=True, desc="embed", file=sys.stderr,
             leave=False, disable=not progress) as bar,
    ):  # fmt: skip
        for shard in shards:
            records = reader.records(shard.offset, shard.records)
            sequences = [encode(record.sequence) for record in records]
            items = embed_tokens(loaded.model, sequences, layers=layers,
                                 tokens_per_batch=tokens_per_batch, per_residue=per_residue,
                                 device=loaded.device, precision=precision)  # fmt: skip
            write_shard(folder / shard.name, records, items, dim=loaded.config.dim,
                             num_layers=len(layers), per_residue=per_residue,
                             attrs={"run": digest, "shard": shard.index}, progress=bar)  # fmt: skip
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    """``protperf embed``: parse ``argv`` and embed; returns the exit status."""
    return run_verb(
        embed,
        argv,
        prog="protperf embed",
        positional=("fasta",),
        short={"out": "-o"},
        threads=True,
    )
