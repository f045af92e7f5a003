"""`protperf embed`: protein (and residue) embeddings of a FASTA file, in the manner of ESM's extract.

    protperf embed sequences.fasta [--model MODEL] [-o embeddings.h5] [--per-residue]
        [--layers -1 ...] [--tokens-per-batch N] [--device cpu|cuda] [--precision 32|bf16-mixed]
        [--skip-invalid] [--overwrite]

Each protein is read as ``<bos> sequence <eos>``, whole: no cropping, whatever its length (FAVOR+
costs linear time and memory in the length). Proteins are batched by a token budget, longest
first (ESM's scheme: a batch takes proteins while count x longest stays within the budget; a
protein longer than the budget runs alone); the embedding of a protein does not depend on its
batch (padding is masked out of attention and the mean).

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
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protperf import __version__, runtime
from protperf.commandline import run_verb
from protperf.durable import atomic_file, check_output_file
from protperf.errors import InputError
from protperf.fasta import FastaRecord, read_fasta
from protperf.inference import Precision, autocast, load_for_inference, weights_fingerprint
from protperf.model import PerformerLM
from protperf.runtime import MatmulPrecision
from protperf.tokenizer import batch_encode, encode

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


def write_embeddings(
    out: Path,
    records: Sequence[FastaRecord],
    items: Iterator[tuple[int, Tensor, Tensor | None]],
    *,
    dim: int,
    num_layers: int,
    per_residue: bool,
    attrs: dict[str, object],
    progress: object | None = None,
    overwrite: bool = True,
) -> None:
    """Write the HDF5 layout of the module docstring from :func:`embed_tokens`'s items.

    The file is written as ``.<name>.<pid>.tmp`` beside ``out`` and renamed onto ``out`` only
    when complete; on any error or interrupt the temporary file is removed. Without
    ``overwrite`` an ``out`` that appeared meanwhile is kept (an :class:`InputError`).
    """
    import h5py

    lengths = np.array([len(r.sequence) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    layer_axis = (num_layers,) if num_layers > 1 else ()
    means = np.zeros((len(records), *layer_axis, dim), dtype=np.float32)
    with atomic_file(out, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
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
            if progress is not None:
                progress.update(int(lengths[index]))
        if not seen.all():
            raise RuntimeError(f"{int((~seen).sum())} proteins were not embedded")
        f.create_dataset("mean", data=means)
        f.attrs.update(attrs)


def embed(
    fasta: Path,
    model: str | None = None,
    out: Path | None = None,
    per_residue: bool = False,
    layers: tuple[int, ...] = (-1,),
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    device: str = "cpu",
    precision: Precision = "32",
    float32_matmul_precision: MatmulPrecision = "high",
    skip_invalid: bool = False,
    overwrite: bool = False,
) -> Path:
    """Embed the proteins of a FASTA file with a protperf model into an HDF5 file.

    Writes the datasets ids, descriptions and mean (N x D float32, mean over residues), plus
    residues and offsets with --per-residue (the layout: docs/data.md). Proteins are
    never cropped. The output appears only when complete; an invalid input writes nothing, and
    an existing file is replaced only with --overwrite.

    Args:
        fasta: FASTA file (plain or gzipped); lower case accepted, a final '*' removed.
        model: a packaged model's name, a run folder, an export folder or a Lightning .ckpt
            (default: the most recent export under ./runs).
        out: output HDF5 (default: the FASTA name with .h5, in the current folder).
        per_residue: also store every residue's embedding (residues, offsets).
        layers: layers to return: 0 = token embedding, i = block i, -1 = final (layer-normed).
        tokens_per_batch: token budget of a batch (count x longest, with <bos>/<eos>).
        device: cpu, cuda or cuda:N.
        precision: 32 (float32) or bf16-mixed / 16-mixed autocast; outputs are float32.
        float32_matmul_precision: float32 products: high = TF32 on CUDA (FAVOR+ computes in
            float32 even under autocast), highest = IEEE float32, medium = bfloat16 on
            CPUs with AMX too. A CPU gives the same numbers with high and highest.
        skip_invalid: skip (and report) records with no sequence or non-amino-acid letters.
        overwrite: replace an existing output file.
    """
    start = time.perf_counter()
    fasta = Path(fasta)
    out = Path(out) if out is not None else default_output(fasta)
    check_output_file(out, overwrite=overwrite)
    if tokens_per_batch <= 0:
        raise InputError(f"--tokens-per-batch must be positive, got {tokens_per_batch}")
    records, skipped = read_fasta(fasta, skip_invalid=skip_invalid)
    loaded = load_for_inference(model, device)
    config = loaded.config
    resolved = resolve_layers(layers, config.depth)
    if config.positions == "learned":
        limit = config.max_length - 2
        for number, record in enumerate(records, start=1):
            if len(record.sequence) > limit:
                raise InputError(
                    f"{fasta}: record {number} ({record.id!r}) has {len(record.sequence)} "
                    f"residues; this model's learned positions read at most {limit}"
                )
    for item in skipped:
        print(f"skipped record {item.number} ({item.id!r}): {item.reason}", file=sys.stderr)

    from tqdm import tqdm

    sequences = [encode(record.sequence) for record in records]
    total = sum(len(s) for s in sequences)
    attrs = {
        "model": str(loaded.path),
        "model_id": weights_fingerprint(loaded.model),
        "model_config": json.dumps(config.to_dict()),
        "mode": loaded.mode,
        "layers": np.array(resolved, dtype=np.int64),
        "precision": precision,
        "float32_matmul_precision": float32_matmul_precision,
        "per_residue": per_residue,
        "protperf_version": __version__,
        "num_sequences": len(records),
        "num_residues": total,
        "skipped_ids": [item.id for item in skipped],
        "fasta": str(fasta),
    }
    items = embed_tokens(
        loaded.model,
        sequences,
        layers=resolved,
        tokens_per_batch=tokens_per_batch,
        per_residue=per_residue,
        device=loaded.device,
        precision=precision,
    )
    with (
        runtime.float32_matmul_precision(float32_matmul_precision),
        tqdm(
            total=total, unit="res", unit_scale=True, desc="embed", file=sys.stderr, leave=False
        ) as progress,
    ):
        embed_start = time.perf_counter()
        write_embeddings(
            out,
            records,
            items,
            dim=config.dim,
            num_layers=len(resolved),
            per_residue=per_residue,
            attrs=attrs,
            progress=progress,
            overwrite=overwrite,
        )
        seconds = time.perf_counter() - embed_start
    print(
        f"embedded {len(records):,} proteins ({total:,} residues) with {loaded.describe()} "
        f"in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} residues/s; "
        f"{time.perf_counter() - start:.1f} s in all)"
        + (f"; skipped {len(skipped)} invalid record(s)" if skipped else ""),
        file=sys.stderr,
    )
    print(out)
    return out


def main(argv: list[str]) -> int:
    """``protperf embed``: parse ``argv`` and embed; returns the exit status."""
    return run_verb(
        embed,
        argv,
        prog="protperf embed",
        positional=("fasta",),
        short={"out": "-o"},
    )
