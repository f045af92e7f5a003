"""`protperf generate`: sample proteins from a unidirectional model, one token at a time.

    protperf generate [--model MODEL] [-n 10] [--prompt MKT...] [--temperature T] [--top-p P]
        [--max-length N] [--seed S] [-o out.fasta [--overwrite]]

Decoding uses the causal recurrence (:meth:`protperf.model.PerformerLM.decode_step`): for FAVOR+
each layer carries a running m x (d+1) state per head, so every new token costs the same whatever
the length, and the logits equal those of the full forward pass over the prefix (so greedy
decoding, ``--temperature 0``, gives the full forward's argmax token for token). Exact-attention
models decode with a growing key/value cache.

Every sequence starts with ``<bos>`` and the prompt; the model's distribution is restricted to
the 25 residue letters and ``<eos>`` (never ``<pad>``, ``<bos>``, ``<mask>``, ``<unk>``); ``<eos>``
ends the sequence (it is not allowed before the first residue, so no sequence is empty), as
does reaching ``--max-length`` residues (noted in the header). Sequence i draws its random
numbers from its own generator seeded by (seed, i): the output depends on ``--seed`` only, not
on ``-n`` or ``--batch-size`` (up to floating-point rounding of batched arithmetic).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protperf.attention import KERNEL_NAMES, NO_STEP
from protperf.commandline import run_verb
from protperf.durable import atomic_file, check_output_file
from protperf.errors import InputError
from protperf.fasta import ALPHABET, FastaRecord, write_fasta
from protperf.inference import load_for_inference
from protperf.model import PerformerLM
from protperf.seeds import derive_seed
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, VOCAB_SIZE, decode, encode

#: Tokens a generated sequence may contain (residues), plus <eos>, which ends it.
EMITTABLE = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
EMITTABLE[FIRST_RESIDUE_ID:] = True
EMITTABLE[EOS] = True


@dataclass
class Generated:
    """One sampled protein: residue ids (prompt included) and whether ``<eos>`` ended it."""

    index: int
    tokens: np.ndarray
    ended: bool


def restrict_logits(logits: Tensor, allow_eos: Tensor) -> Tensor:
    """Mask what may not be emitted. logits: (B, V); allow_eos: (B,) bool -> (B, V) float32 with
    -inf at special tokens (and at ``<eos>`` where not allowed)."""
    allowed = EMITTABLE.to(logits.device).expand_as(logits).clone()
    allowed[:, EOS] &= allow_eos.to(logits.device)
    return logits.float().masked_fill(~allowed, -torch.inf)


def sample_next(
    logits: Tensor,
    generators: Sequence[torch.Generator],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw one token per row. logits: (B, V) (already restricted) -> (B,) int64 on the CPU.

    ``temperature`` 0 is greedy (argmax). Otherwise softmax(logits / temperature), cut to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling),
    and one uniform draw per row from that row's generator (inverse CDF).
    """
    logits = logits.detach().cpu().double()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:
        # Keep a token while the mass before it is below top_p (the most likely is always kept).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    cumulative = sorted_probs.cumsum(dim=-1)
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    targets = uniforms[:, None] * cumulative[:, -1:]
    picks = torch.searchsorted(cumulative, targets, right=True).clamp(max=logits.shape[-1] - 1)
    return order.gather(-1, picks)[:, 0]


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise :class:`InputError` unless ``temperature`` is finite and >= 0 and ``top_p`` in
    (0, 1] (a NaN would turn every probability into NaN, and no token would ever be drawn)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0, not {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"--top-p must be in (0, 1], not {top_p}")


@torch.no_grad()
def generate_tokens(
    model: PerformerLM,
    *,
    num: int,
    prompt: np.ndarray | None = None,
    max_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: object | None = None,
) -> list[Generated]:
    """Sample ``num`` proteins of at most ``max_length`` residues (prompt included).

    Batches of ``batch_size`` sequences decode together; a sequence that ends leaves the batch
    (its rows of the decoding states are dropped). Returns them in index order.
    """
    check_sampling(temperature, top_p)
    prompt = np.zeros(0, dtype=np.uint8) if prompt is None else np.asarray(prompt)
    if len(prompt) >= max_length:
        raise InputError(f"the prompt has {len(prompt)} residues, --max-length is {max_length}")
    device = torch.device(device)
    context = [BOS, *(int(t) for t in prompt)]
    results: list[Generated] = []
    for first in range(0, num, batch_size):
        rows = list(range(first, min(num, first + batch_size)))
        generators = [torch.Generator().manual_seed(derive_seed(seed, row)) for row in rows]
        states = None
        for position, token in enumerate(context):
            tokens = torch.full((len(rows),), token, dtype=torch.long, device=device)
            logits, states = model.decode_step(tokens, states, position)
        position = len(context)
        outputs = [list(context[1:]) for _ in rows]
        ended = [False] * len(rows)
        active = list(range(len(rows)))
        while True:
            allow_eos = torch.tensor([len(outputs[r]) > 0 for r in active])
            restricted = restrict_logits(logits, allow_eos)
            picked = sample_next(
                restricted,
                [generators[r] for r in active],
                temperature=temperature,
                top_p=top_p,
            )
            keep = []
            for j, r in enumerate(active):
                token = int(picked[j])
                if token == EOS:
                    ended[r] = True
                    continue
                outputs[r].append(token)
                if len(outputs[r]) < max_length:
                    keep.append(j)
            if progress is not None:
                progress.update(len(active))
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                states = model.select_decode_states(states, index)
                picked = picked[keep]
            active = [active[j] for j in keep]
            logits, states = model.decode_step(picked.to(device), states, position)
            position += 1
        for r, row in enumerate(rows):
            results.append(Generated(row, np.asarray(outputs[r], dtype=np.uint8), ended[r]))
    return results


def _write(records: list[FastaRecord], out: Path | None, *, overwrite: bool) -> None:
    if out is None:
        write_fasta(records, sys.stdout)
        return
    with atomic_file(out, overwrite=overwrite) as tmp, open(tmp, "w") as handle:
        write_fasta(records, handle)


def generate(
    model: str | None = None,
    num: int = 10,
    prompt: str = "",
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_length: int | None = None,
    seed: int = 0,
    out: Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    overwrite: bool = False,
) -> list[Generated]:
    """Sample proteins from a unidirectional (causal) model and write them as FASTA.

    Decodes with the model's recurrence (constant cost per token for FAVOR+). Only residue
    letters are emitted; <eos> ends a sequence.

    Args:
        model: a packaged model's name, a run folder, an export folder or a Lightning .ckpt
            (default: the most recent unidirectional export under ./runs).
        num: number of proteins.
        prompt: residues every protein starts with (e.g. MKT), any case.
        temperature: softmax temperature; 0 = greedy (argmax).
        top_p: nucleus sampling: sample among the most likely tokens holding this much mass.
        max_length: maximum residues per protein, prompt included (default: the model's
            max_length - 2).
        seed: random seed; protein i depends only on (seed, i).
        out: FASTA file to write (default: standard output).
        batch_size: proteins decoded together.
        device: cpu, cuda or cuda:N.
        overwrite: replace an existing -o file.
    """
    if num <= 0 or batch_size <= 0:
        raise InputError("-n and --batch-size must be positive")
    check_sampling(temperature, top_p)
    residues = "".join(prompt.split()).upper()
    bad = sorted(set(residues) - ALPHABET)
    if bad:
        raise InputError(f"--prompt: not amino-acid letters: {', '.join(map(repr, bad))}")
    if out is not None:
        check_output_file(out, overwrite=overwrite)
    loaded = load_for_inference(model, device, causal=True)
    config = loaded.config
    if not config.causal:
        raise InputError(
            f"--model {loaded.path} is a bidirectional (masked) model; generate samples from "
            "unidirectional (causal) models only"
        )
    if not config.decodes:
        raise InputError(
            f"--model {loaded.path}: " + NO_STEP.format(kernel=KERNEL_NAMES[config.kernel])
        )
    limit = config.max_length - 1 if config.length_limit is not None else None
    if max_length is None:
        max_length = config.max_length - 2
    if max_length <= 0 or (limit is not None and max_length > limit):
        raise InputError(
            f"--max-length {max_length}: must be in [1, {limit or 'any'}] for this model"
        )
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(unit="tok", desc="generate", file=sys.stderr, leave=False) as progress:
        generated = generate_tokens(
            loaded.model,
            num=num,
            prompt=encode(residues),
            max_length=max_length,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            device=loaded.device,
            progress=progress,
        )
    seconds = time.perf_counter() - start
    width = len(str(num))
    records = [
        FastaRecord(
            f"generated_{g.index + 1:0{width}d}",
            f"generated_{g.index + 1:0{width}d} length={len(g.tokens)} "
            f"stop={'eos' if g.ended else 'max_length'} temperature={temperature} "
            f"top_p={top_p} seed={seed}" + (f" prompt={residues}" if residues else ""),
            decode(g.tokens),
        )
        for g in generated
    ]
    _write(records, out, overwrite=overwrite)
    tokens = sum(len(g.tokens) - len(residues) + g.ended for g in generated)
    print(
        f"generated {num} proteins ({tokens:,} tokens) with {loaded.describe()} in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)" + (f" -> {out}" if out else ""),
        file=sys.stderr,
    )
    return generated


def main(argv: list[str]) -> int:
    """``protperf generate``: parse ``argv`` and sample; returns the exit status."""
    return run_verb(
        generate, argv, prog="protperf generate", short={"num": "-n", "out": "-o"}, threads=True
    )
