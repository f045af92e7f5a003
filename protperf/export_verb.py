"""``protperf export``: a model written as a folder of its own, protperf's export or a Hugging
Face model.

The verb sits above :mod:`protperf.export` (the format) and :mod:`protperf.pretrained` (models
by name), which it both needs, and which import nothing of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from protperf import export as exports
from protperf.commandline import run_verb
from protperf.durable import check_output_folder, reporting_full_disk
from protperf.errors import InputError
from protperf.pretrained import resolve_model


def export(
    model: str,
    out: Path,
    format: Literal["protperf", "hf"] = "protperf",
    overwrite: bool = False,
) -> Path:
    """Write a model as a folder of its own: protperf's export, or a Hugging Face model.

    --format protperf writes model.safetensors, config.json and tokenizer.json, which --model
    and protperf.load_model read. --format hf writes a folder that transformers'
    AutoModelForCausalLM / AutoModelForMaskedLM and AutoTokenizer load with from_pretrained
    after `import protperf.hf` (needs pip install 'protperf[hf]'). OUT appears only when
    complete.

    Example: protperf export runs/demo runs/demo-hf --format hf

    Args:
        model: a packaged model's name, a run folder, an export folder or a .ckpt.
        out: the folder to write.
        format: protperf (the export that --model reads) or hf (Hugging Face transformers).
        overwrite: replace OUT when it exists.
    """
    if out.exists() and not overwrite:
        raise InputError(f"OUT {out}: the folder exists; pass --overwrite to replace it")
    check_output_folder(out, option="OUT")
    if format == "hf":
        try:
            from protperf import hf
        except ImportError as error:
            raise InputError(f"--format hf: {error}") from None
    source = resolve_model(model)
    loaded = exports.read_model(source)
    mode = "unidirectional" if loaded.config.causal else "bidirectional"
    if format == "protperf":
        exports.export_model(loaded, out, mode=mode, metadata=exports.export_metadata(source))
    else:
        staging = exports.staging_folder(out)
        try:
            with reporting_full_disk(out):
                hf.save_hf(loaded, staging)
                exports.publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"wrote {out} ({format}, {mode}, from {source})")
    return out


def main(argv: list[str]) -> int:
    """``protperf export``: returns the exit status."""
    return run_verb(export, argv, prog="protperf export", positional=("model", "out"))
