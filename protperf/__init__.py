"""protperf: protein language models on Performers (FAVOR+ attention).

The public API, in the manner of ESM and litgpt::

    from protperf import PerformerLM, PerformerConfig, FastAttention, load_model, tokenizer

    model = load_model("runs/tiny-cpu-uni")  # a run, an export, a .ckpt or a packaged name
    tokens, padding_mask = tokenizer.batch_encode(["MKTAYIAKQR", "MSLLT"])
    out = model(tokens, padding_mask, repr_layers=[model.config.depth])  # logits, representations

Names are imported on first use, so that ``import protperf`` (and the ``protperf`` command's
start) does not pay for torch until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "PerformerLM": "protperf.model",
    "PerformerConfig": "protperf.model",
    "FastAttention": "protperf.attention",
    "load_model": "protperf.pretrained",
    "tokenizer": "protperf.tokenizer",
}

__all__ = [
    "FastAttention",
    "PerformerConfig",
    "PerformerLM",
    "__version__",
    "load_model",
    "tokenizer",
]

if TYPE_CHECKING:
    from protperf import tokenizer
    from protperf.attention import FastAttention
    from protperf.model import PerformerConfig, PerformerLM
    from protperf.pretrained import load_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'protperf' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"protperf.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
