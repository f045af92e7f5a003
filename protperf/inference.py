"""What the inference verbs (embed, evaluate, generate) share: loading a model onto a device,
mixed precision and a fingerprint of the weights (their outputs are written whole by
:func:`protperf.durable.atomic_file`)."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from protperf.attention import KERNEL_NAMES
from protperf.errors import InputError
from protperf.model import PerformerConfig, PerformerLM

Precision = Literal["32", "bf16-mixed", "16-mixed"]
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for inference and what the outputs should record about it."""

    model: PerformerLM
    config: PerformerConfig
    path: Path
    device: torch.device

    @property
    def mode(self) -> str:
        return "unidirectional" if self.config.causal else "bidirectional"

    @property
    def name(self) -> str:
        return KERNEL_NAMES[self.config.kernel]

    def describe(self) -> str:
        c = self.config
        return (
            f"{self.name}, {self.mode}, {c.depth} layers, d {c.dim}, {c.heads} heads, "
            f"{self.model.num_parameters():,} parameters"
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; a clear error when CUDA is missing."""
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def locate_model(name_or_path: str | Path | None, *, causal: bool | None = None) -> Path:
    """The folder or file of a model given by packaged name or path, without reading it.

    None: the default model (:func:`protperf.pretrained.default_model`, a causal one when
    ``causal``), named on stderr. A model that does not exist is an :class:`InputError`.
    """
    from protperf.pretrained import RUNS_DIR, default_model, packaged_models, resolve_model

    if name_or_path is not None:
        return resolve_model(name_or_path)
    path = default_model(causal=causal)
    packaged = {folder: name for name, folder in packaged_models().items()}
    if path in packaged:
        print(f"using the packaged model {packaged[path]} (no --model given and no "
              f"export under {RUNS_DIR}/)", file=sys.stderr)  # fmt: skip
    else:
        print(f"using --model {path} (the most recent export)", file=sys.stderr)
    return path


def load_for_inference(
    name_or_path: str | Path | None, device: str | torch.device = "cpu", *,
    causal: bool | None = None,
) -> LoadedModel:  # fmt: skip
    """Load a model by packaged name or path (a run folder, an export folder or a Lightning
    ``.ckpt``; nothing unpickled), in eval mode on ``device``; None is the default model
    (:func:`locate_model`). Any loading failure is an :class:`InputError` naming the model.
    """
    from protperf.export import read_model

    resolved = resolve_device(device)
    path = locate_model(name_or_path, causal=causal)
    try:
        model = read_model(path, device=resolved)
    except InputError as error:  # names the file at fault: a damaged checkpoint or export
        named = str(error).startswith(str(path))
        raise InputError(f"--model {error}" if named else f"--model {path}: {error}") from error
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as error:
        raise InputError(f"--model {path}: cannot load a protperf model ({error})") from error
    return LoadedModel(model, model.config, path, resolved)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Mixed precision for ``bf16-mixed`` / ``16-mixed``; nothing for ``32``.

    FAVOR+ computes its features in float32 whatever the autocast dtype (protperf.attention).
    """
    if precision == "32":
        yield
        return
    if precision not in AUTOCAST_DTYPES:
        raise InputError(f"precision must be one of 32, bf16-mixed, 16-mixed, not {precision!r}")
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision]):
        yield


def weights_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:<hex>`` of the state dict (names, dtypes, shapes, values; features included).

    The same weights give the same id whether loaded from a checkpoint or an export.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(
            value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        )
    return "sha256:" + digest.hexdigest()
