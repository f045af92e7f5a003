"""The `protperf` command: one verb per module, imported only when that verb runs.

Each verb module exposes ``main(argv: list[str]) -> int``, which runs the verb's typed function
through :mod:`protperf.commandline` (the one mechanism behind every verb's options and
``--help``). Keeping imports lazy makes ``protperf --help`` instant.
"""

from __future__ import annotations

import importlib
import sys

from protperf import __version__
from protperf.runtime import tune_process

#: verb -> (module, one-line summary).
VERBS: dict[str, tuple[str, str]] = {
    "prepare-data": (
        "protperf.prepare",
        "download a UniProt release (or read FASTA/flat files) into tokenized HDF5 datasets",
    ),
    "train": (
        "protperf.train",
        "train a Performer protein LM (Lightning; YAML configs, multi-GPU)",
    ),
    "plot": ("protperf.plot", "draw a run's accuracy and perplexity curves (PNG)"),
    "embed": ("protperf.embed", "embed the proteins of a FASTA file (mean and per-residue, HDF5)"),
    "evaluate": ("protperf.evaluate", "accuracy and perplexity per split vs the unigram baseline"),
    "generate": ("protperf.generate", "sample proteins from a unidirectional model (FASTA)"),
    "score": ("protperf.score", "log-likelihoods of proteins and the effects of mutations (CSV)"),
    "probe": ("protperf.probe", "fit predictors on frozen embeddings, test and apply them"),
    "models": ("protperf.models", "list the packaged models and the exports of local runs"),
    "export": ("protperf.export_verb", "write a model as a protperf or Hugging Face folder"),
}
#: Verbs that run models: subnormal floats flush to zero in them (protperf/runtime.py).
MODEL_VERBS = frozenset({"train", "embed", "evaluate", "generate", "score", "probe", "export"})


def _usage() -> str:
    width = max((len(verb) for verb in VERBS), default=0)
    lines = [
        "usage: protperf <verb> [options]    (protperf <verb> --help for a verb's options)",
        "",
        "Protein language models on Performers (FAVOR+ linear attention).",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this message",
        "  --version      show the version",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``protperf <verb> ...`` to the verb's module; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"protperf {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        known = ", ".join(VERBS)
        print(f"protperf: error: unknown verb {verb!r}: use one of {known} (see protperf --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    tune_process(runs_models=verb in MODEL_VERBS)  # before torch: see protperf/runtime.py
    module = importlib.import_module(VERBS[verb][0])
    status = module.main(rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
