"""The two training objectives, for training and evaluation alike: batches, loss and accuracy.

* Next token (the unidirectional, causal LM): over ``<bos> sequence <eos>`` (or a concat chunk)
  predict token t+1 from the tokens up to t.
* Masked LM (the bidirectional model): BERT's corruption of 15% of the residues (80% ``<mask>``,
  10% a random residue, 10% unchanged), predicting the selected ones. The draws come from a
  seed per sample, so DDP shards, batch composition, worker count and a resumed run all see the
  same masks, and ``protperf evaluate`` reproduces the masks of the training run's evaluation.

The metrics are the paper's: token-weighted accuracy and perplexity = exp(mean cross-entropy)
over the predicted positions only (padding never counts; only the masked positions for the
masked LM); :func:`token_statistics` gives them per token, for training's torchmetrics
accumulators (protperf.lit) and evaluation's sums alike.

Shapes: B batch, L length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protperf.seeds import derive_seed
from protperf.tokenizer import FIRST_RESIDUE_ID, MASK, VOCAB_SIZE

#: Targets with this value carry no loss (padding, unmasked positions).
IGNORE_INDEX = -100
NUM_RESIDUES = VOCAB_SIZE - FIRST_RESIDUE_ID
_MASK_SALT = 0x6D61736B  # "mask": keeps mask draws independent of the data module's crop draws


@dataclass
class MaskingConfig:
    """Masked-LM corruption (BERT's recipe by default)."""

    mask_prob: float = 0.15
    """Fraction of the residues selected for prediction (<bos>, <eos>, <pad> never are)."""
    mask_token_prob: float = 0.8
    """Of the selected, the fraction replaced by <mask>."""
    random_token_prob: float = 0.1
    """Of the selected, the fraction replaced by a random residue (the rest stay unchanged)."""

    def __post_init__(self) -> None:
        probs = (self.mask_prob, self.mask_token_prob, self.random_token_prob)
        if (
            not all(0.0 <= p <= 1.0 for p in probs)
            or self.mask_token_prob + self.random_token_prob > 1
        ):
            raise ValueError(f"invalid masking probabilities {self}")


# ---------------------------------------------------------------------------------------------
# Batches: tokens -> (inputs, targets, padding mask)
# ---------------------------------------------------------------------------------------------


def next_token_batch(
    tokens: Tensor, padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Next-token objective. tokens, padding_mask: (B, L).

    Returns inputs (B, L-1) = tokens[:, :-1], targets (B, L-1) = tokens[:, 1:] with
    ``IGNORE_INDEX`` at padding, and the inputs' padding mask (None when nothing is padded).
    """
    targets = tokens[:, 1:].clone()
    input_padding = None
    if padding_mask is not None:
        targets = targets.masked_fill(padding_mask[:, 1:], IGNORE_INDEX)
        input_padding = padding_mask[:, :-1]
        if not bool(input_padding.any()):
            input_padding = None
    return tokens[:, :-1], targets, input_padding


def masked_batch(
    tokens: Tensor,
    padding_mask: Tensor | None,
    sample_seeds: Sequence[int] | None,
    masking: MaskingConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Masked-LM objective: BERT corruption drawn from each sample's seed (from the global RNG
    when ``sample_seeds`` is None). tokens, padding_mask: (B, L).

    Returns inputs (B, L) corrupted, targets (B, L) (the original residue at selected positions,
    ``IGNORE_INDEX`` elsewhere) and the padding mask unchanged.
    """
    if sample_seeds is None:
        uniforms = torch.rand(*tokens.shape, 3, device=tokens.device)
    else:
        uniforms = sample_uniforms(list(sample_seeds), tokens.shape[1]).to(tokens.device)
    inputs, targets = mask_tokens(tokens, uniforms, **asdict(masking or MaskingConfig()))
    return inputs, targets, padding_mask


def objective_batch(
    batch: dict[str, Any], *, causal: bool, masking: MaskingConfig | None = None
) -> dict[str, Any]:
    """A data-module batch (``tokens``, ``padding_mask``, ``sample_seed``, ``split``) as the
    model's ``inputs``, ``targets`` and ``padding_mask`` for either objective."""
    tokens, padding = batch["tokens"], batch.get("padding_mask")
    if causal:
        inputs, targets, padding = next_token_batch(tokens, padding)
    else:
        seeds = batch.get("sample_seed")
        seeds = None if seeds is None else seeds.tolist()
        inputs, targets, padding = masked_batch(tokens, padding, seeds, masking)
    return {
        "inputs": inputs,
        "targets": targets,
        "padding_mask": padding,
        "split": batch.get("split"),
    }


def mask_tokens(
    tokens: Tensor,
    uniforms: Tensor,
    *,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """BERT-style corruption of residue tokens, deterministic given the uniform draws.

    Args:
        tokens: (B, L) token ids; only residues (ids >= FIRST_RESIDUE_ID) can be selected, never
            <bos>, <eos>, <pad>.
        uniforms: (B, L, 3) values in [0, 1): selection, replacement kind, random residue.

    Returns:
        (inputs, targets), each (B, L): inputs with <mask> / random residues substituted; targets
        holding the original token at selected positions and ``IGNORE_INDEX`` elsewhere.
    """
    select, kind, pick = uniforms.unbind(-1)
    selected = (tokens >= FIRST_RESIDUE_ID) & (select < mask_prob)
    to_mask = selected & (kind < mask_token_prob)
    to_random = selected & (kind >= mask_token_prob) & (kind < mask_token_prob + random_token_prob)
    random_ids = FIRST_RESIDUE_ID + (pick * NUM_RESIDUES).long().clamp(max=NUM_RESIDUES - 1)
    inputs = torch.where(to_mask, MASK, torch.where(to_random, random_ids, tokens))
    targets = torch.where(selected, tokens, IGNORE_INDEX)
    return inputs, targets


def sample_uniforms(sample_seeds: list[int], length: int) -> Tensor:
    """(B, length, 3) uniforms in [0, 1), row b drawn from its own seed.

    Position-major draws: the first n positions of a row are the same whatever ``length`` (the
    padded length of the batch it lands in) is.
    """
    rows = []
    for seed in sample_seeds:
        generator = torch.Generator().manual_seed(derive_seed(seed, _MASK_SALT))
        rows.append(torch.rand(length, 3, generator=generator))
    return torch.stack(rows) if rows else torch.empty(0, length, 3)


# ---------------------------------------------------------------------------------------------
# Loss and accuracy
# ---------------------------------------------------------------------------------------------


def token_statistics(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position (cross-entropy, correct, counted), each (B*L,) float32.

    logits: (B, L, V); targets: (B, L) with ``IGNORE_INDEX`` at positions that do not count.
    """
    flat_targets = targets.flatten()
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), flat_targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = (flat_targets != IGNORE_INDEX).float()
    correct = (logits.argmax(-1).flatten() == flat_targets).float() * counted
    return nll, correct, counted


def mean_loss(nll: Tensor, counted: Tensor) -> Tensor:
    """The mean cross-entropy over the counted tokens (0 when none is counted)."""
    return nll.sum() / counted.sum().clamp(min=1.0)
