"""A protein's features for a probe: pooled states of a model, or of an embeddings file.

Each protein is read whole as ``<bos> sequence <eos>``; for each of K layers (ESM's numbering,
as in :mod:`protperf.embed`) the states are pooled P ways, and the K x P x D values, layer by
layer, are its features (F = K P D):

- ``mean``, ``max``, ``std``: over the residues (``<bos>``, ``<eos>`` and padding excluded;
  ``mean`` is embed's ``mean``);
- ``bos``, ``eos``: the state at ``<bos>`` (a masked model's summary position) or at ``<eos>``
  (the one position of a causal model that has read the whole protein);
- ``n-term``, ``c-term``: the mean over the first / last :data:`TERMINUS_RESIDUES` residues,
  where sorting signals sit (signal and transit peptides, PTS1, KDEL).

An embeddings file gives ``mean`` from its ``mean`` dataset and the other residue poolings from
its ``residues`` (``embed --per-residue``); it holds no ``<bos>`` or ``<eos>`` states. The
composition baseline's features (:func:`composition_features`) need no model.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from protperf.embed import DEFAULT_TOKENS_PER_BATCH, resolve_layers
from protperf.errors import InputError
from protperf.fasta import FastaRecord
from protperf.inference import Precision
from protperf.tokenizer import STANDARD_AMINO_ACIDS

Pooling = Literal["mean", "max", "std", "bos", "eos", "n-term", "c-term"]
#: Residues that ``n-term`` and ``c-term`` pool: signal and most transit peptides lie within them.
TERMINUS_RESIDUES = 32
#: Positions of the special tokens in a protein's states (``<bos>`` residues ``<eos>``).
TOKEN_POSITIONS = {"bos": 0, "eos": -1}
#: The poolings over residues: (K, L, D) -> (K, D).
RESIDUE_POOLS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda r: r.mean(axis=1),
    "max": lambda r: r.max(axis=1),
    "std": lambda r: r.std(axis=1),
    "n-term": lambda r: r[:, :TERMINUS_RESIDUES].mean(axis=1),
    "c-term": lambda r: r[:, -TERMINUS_RESIDUES:].mean(axis=1),
}


@dataclass(frozen=True)
class FeatureSpec:
    """How a probe's features are made: the model (as --model names it) and the fingerprint of
    its weights, the resolved layers (0..depth), the pooling, and the model's width D."""

    model: str
    model_id: str
    layers: tuple[int, ...]
    pooling: tuple[str, ...]
    dim: int

    @classmethod
    def from_dict(cls, values: dict) -> FeatureSpec:
        """The spec a probe.json records (its other keys ignored)."""
        return cls(str(values["model"]), str(values["model_id"]), tuple(values["layers"]),
                   tuple(values["pooling"]), int(values["dim"]))  # fmt: skip

    @property
    def size(self) -> int:
        """F = K layers x P poolings x D."""
        return len(self.layers) * len(self.pooling) * self.dim

    def describe(self) -> str:
        plural = "s" if len(self.layers) > 1 else ""
        layers = " ".join(map(str, self.layers))
        return f"{self.model}, layer{plural} {layers}, {' + '.join(self.pooling)}"


def pool_states(states: np.ndarray, pooling: Sequence[str], *, specials: bool = True) -> np.ndarray:
    """One protein's states, (K, L + 2, D) with ``<bos>`` and ``<eos>`` (``specials``) or
    (K, L, D) without -> (K, P, D), one pooled vector per layer and pooling."""
    residues = states[:, 1:-1] if specials else states
    pooled = []
    for part in pooling:
        if part in TOKEN_POSITIONS:
            pooled.append(states[:, TOKEN_POSITIONS[part]])
        else:
            pooled.append(RESIDUE_POOLS[part](residues))
    return np.stack(pooled, axis=1)


def model_features(
    model, sequences: Sequence[np.ndarray], *, layers: Sequence[int], pooling: Sequence[str],
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, device="cpu", precision: Precision = "32",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:  # fmt: skip
    """Pooled states of an eval-mode model over proteins batched by a token budget.

    Args:
        model: a :class:`~protperf.model.PerformerLM` on ``device``.
        sequences: residue token ids of each protein, each (L_i,).
        layers: resolved layer indices (0..depth), K of them; pooling: P poolings.
        progress: called with each protein's residue count once it is pooled.

    Returns:
        (N, K, P, D) float32, in the order of ``sequences``.
    """
    import torch

    from protperf.embed import forward_batches

    out = np.zeros((len(sequences), len(layers), len(pooling), model.config.dim), np.float32)
    batches = forward_batches(
        model, [len(s) for s in sequences], sequences.__getitem__,
        tokens_per_batch=tokens_per_batch, device=device, precision=precision, repr_layers=layers,
    )  # fmt: skip
    for batch, result in batches:
        states = torch.stack([result["representations"][layer] for layer in layers], dim=1)
        states = states.float().cpu().numpy()  # (B, K, L_max + 2, D)
        for row, index in enumerate(batch):
            length = len(sequences[index])
            out[index] = pool_states(states[row, :, : length + 2], pooling)
            if progress is not None:
                progress(length)
    return out


def composition_features(sequences: Sequence[str], pooling: Sequence[str] = ()) -> np.ndarray:
    """The baseline's features, (N, 21) float64: the fractions of the 20 standard amino acids and
    the log length; with ``n-term`` / ``c-term`` in ``pooling``, 20 more columns each, the
    fractions among the first / last :data:`TERMINUS_RESIDUES` residues."""
    letters = np.frombuffer(STANDARD_AMINO_ACIDS.encode(), dtype=np.uint8)

    def fractions(sequence: str) -> np.ndarray:
        counts = np.bincount(np.frombuffer(sequence.encode(), dtype=np.uint8), minlength=256)
        return counts[letters] / max(len(sequence), 1)

    regions: list[Callable[[str], str]] = [lambda s: s]
    if "n-term" in pooling:
        regions.append(lambda s: s[:TERMINUS_RESIDUES])
    if "c-term" in pooling:
        regions.append(lambda s: s[-TERMINUS_RESIDUES:])
    rows = [
        np.concatenate([*(fractions(region(s)) for region in regions), [np.log(len(s))]])
        for s in sequences
    ]
    return np.array(rows, dtype=np.float64)


@dataclass(frozen=True)
class EmbeddingFile:
    """What an HDF5 file of ``protperf embed`` holds, its arrays unread."""

    path: Path
    ids: dict[str, int]
    model: str
    model_id: str
    depth: int
    layers: tuple[int, ...]
    per_residue: bool


def open_embedding_file(path: Path) -> EmbeddingFile:
    """Read the ids and attributes of an embeddings file (docs/data.md#embeddings)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--embeddings {path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            ids = f["ids"].asstr()[:].tolist()
            config = json.loads(f.attrs["model_config"])
            return EmbeddingFile(
                path, {protein: row for row, protein in enumerate(ids)}, str(f.attrs["model"]),
                str(f.attrs["model_id"]), int(config["depth"]),
                tuple(int(layer) for layer in np.atleast_1d(f.attrs["layers"])),
                "residues" in f and "offsets" in f,
            )  # fmt: skip
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise InputError(
            f"--embeddings {path}: not an embeddings file of protperf embed ({error})"
        ) from error


def file_features(
    files: Sequence[EmbeddingFile], ids: Sequence[str], *, layers: Sequence[int],
    pooling: Sequence[str],
) -> np.ndarray:  # fmt: skip
    """Pooled embeddings of the proteins ``ids``, looked up by id in ``files`` (which share their
    model and layers): ``mean`` from the files' ``mean``, the other residue poolings from their
    ``residues``. Returns (N, K, P, D) float32."""
    import h5py

    where: dict[str, tuple[int, int]] = {}
    for number, file in enumerate(files):
        for protein, row in file.ids.items():
            where.setdefault(protein, (number, row))
    missing = [protein for protein in ids if protein not in where]
    if missing:
        names = ", ".join(str(file.path) for file in files)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"--embeddings {names}: no embedding of protein {missing[0]!r}{more}")
    columns = [files[0].layers.index(layer) for layer in layers]
    out: np.ndarray | None = None
    for number, file in enumerate(files):
        wanted = [(i, where[p][1]) for i, p in enumerate(ids) if where[p][0] == number]
        if not wanted:
            continue
        with h5py.File(file.path, "r") as f:
            for i, row in wanted:
                pooled = _pool_file_row(f, row, columns, pooling)  # (K, P, D)
                if out is None:
                    out = np.zeros((len(ids), *pooled.shape), np.float32)
                out[i] = pooled
    assert out is not None
    return out


def _pool_file_row(f, row: int, columns: Sequence[int], pooling: Sequence[str]) -> np.ndarray:
    """(K, P, D) of one protein of an open embeddings file (columns: the layers' positions)."""
    parts = []
    for part in pooling:
        if part == "mean":
            mean = f["mean"][row]
            parts.append((mean[None] if mean.ndim == 1 else mean)[columns])
        else:
            start, end = f["offsets"][row : row + 2]
            residues = f["residues"][start:end]  # (L, D) or (L, K, D)
            residues = residues[:, None] if residues.ndim == 2 else residues
            parts.append(
                pool_states(residues.transpose(1, 0, 2)[columns], [part], specials=False)[:, 0]
            )
    return np.stack(parts, axis=1)


def check_embedding_files(
    files: Sequence[EmbeddingFile], layers: Sequence[int], pooling: Sequence[str]
) -> list[int]:
    """Raise unless the files share one model and one set of layers holding ``layers`` and can
    give ``pooling``; returns the layers resolved against the files' model."""
    first = files[0]
    for file in files[1:]:
        if file.model_id != first.model_id or file.layers != first.layers:
            raise InputError(
                f"--embeddings {file.path}: made with other weights or layers than {first.path} "
                "(embed every file with the same --model and --layers)"
            )
    resolved = resolve_layers(layers, first.depth)
    absent = [layer for layer in resolved if layer not in first.layers]
    if absent:
        raise InputError(
            f"--embeddings {first.path}: holds layers {' '.join(map(str, first.layers))}, not "
            f"{' '.join(map(str, absent))} (embed with --layers to include them)"
        )
    tokens = [part for part in pooling if part in TOKEN_POSITIONS]
    if tokens:
        raise InputError(
            f"--pooling {tokens[0]}: embeddings files hold no <{tokens[0]}> states; "
            "compute the features with --model"
        )
    if any(part != "mean" for part in pooling) and not first.per_residue:
        other = next(part for part in pooling if part != "mean")
        raise InputError(
            f"--pooling {other}: needs per-residue embeddings (embed --per-residue); "
            f"{first.path} holds means only"
        )
    return resolved


def _model_name(path: Path, given: str | None) -> str:
    """How to name a model for --model again: its packaged name, else the path."""
    from protperf.pretrained import packaged_models

    packaged = {folder: name for name, folder in packaged_models().items()}
    return packaged.get(Path(path), given if given is not None else str(path))


@dataclass(frozen=True)
class RunOptions:
    """How a model runs: token budget of a batch, device and precision."""

    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH
    device: str = "cpu"
    precision: Precision = "32"


def compute_features(
    records: Sequence[FastaRecord], *, model: str | None, embeddings: Sequence[Path],
    layers: Sequence[int], pooling: Sequence[str], run: RunOptions,
    expected: FeatureSpec | None = None,
) -> tuple[np.ndarray, FeatureSpec]:  # fmt: skip
    """The features of ``records``, (N, F) float32, from ``model`` or the ``embeddings`` files,
    and how they were made. ``expected`` (a saved probe's spec): refuse other weights."""
    if embeddings:
        files = [open_embedding_file(path) for path in embeddings]
        resolved = check_embedding_files(files, layers, pooling)
        spec = FeatureSpec(_model_name(Path(files[0].model), None), files[0].model_id,
                           tuple(resolved), tuple(pooling), _file_dim(files[0]))  # fmt: skip
        _check_same_weights(spec, expected, f"--embeddings {files[0].path}")
        features = file_features(files, [r.id for r in records], layers=resolved, pooling=pooling)
        return features.reshape(len(records), -1), spec
    return _features_of_model(records, model, layers, pooling, run, expected)


def _file_dim(file: EmbeddingFile) -> int:
    import h5py

    with h5py.File(file.path, "r") as f:
        return int(f["mean"].shape[-1])


def _check_same_weights(spec: FeatureSpec, expected: FeatureSpec | None, what: str) -> None:
    if expected is not None and spec.model_id != expected.model_id:
        raise InputError(
            f"{what}: not the weights this probe was fitted on ({spec.model_id[:19]}... against "
            f"{expected.model_id[:19]}...)"
        )


def _features_of_model(
    records: Sequence[FastaRecord], model: str | None, layers: Sequence[int],
    pooling: Sequence[str], run: RunOptions, expected: FeatureSpec | None,
) -> tuple[np.ndarray, FeatureSpec]:  # fmt: skip
    from tqdm import tqdm

    from protperf.inference import load_for_inference, weights_fingerprint
    from protperf.tokenizer import encode

    loaded = load_for_inference(model, run.device)
    config = loaded.config
    resolved = resolve_layers(layers, config.depth)
    longest = max(records, key=lambda record: len(record.sequence))
    if config.positions == "learned" and len(longest.sequence) > config.max_length - 2:
        raise InputError(
            f"protein {longest.id!r} has {len(longest.sequence)} residues; this model's learned "
            f"positions read at most {config.max_length - 2}"
        )
    spec = FeatureSpec(_model_name(loaded.path, model), weights_fingerprint(loaded.model),
                       tuple(resolved), tuple(pooling), config.dim)  # fmt: skip
    _check_same_weights(spec, expected, f"--model {loaded.path}")
    sequences = [encode(record.sequence) for record in records]
    started = time.perf_counter()
    total = sum(map(len, sequences))
    with tqdm(total=total, unit="res", unit_scale=True, desc="probe", file=sys.stderr,
              leave=False) as bar:  # fmt: skip
        features = model_features(
            loaded.model, sequences, layers=resolved, pooling=pooling,
            tokens_per_batch=run.tokens_per_batch, device=loaded.device,
            precision=run.precision, progress=bar.update,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"embedded {len(records):,} proteins ({total:,} residues) with {loaded.describe()} in "
          f"{seconds:.1f} s", file=sys.stderr)  # fmt: skip
    return features.reshape(len(records), -1), spec
