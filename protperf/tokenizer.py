"""The amino-acid alphabet: token ids, fast numpy encoding, and its `tokenizers` tokenizer.json.

Ids (30 tokens, the paper's 29 plus an explicit unknown):

    0 <pad>   1 <bos>   2 <eos>   3 <mask>   4 <unk>
    5..24     the 20 standard amino acids  A C D E F G H I K L M N P Q R S T V W Y
    25..29    the 5 anomalous ones          B O U X Z

Residue letters outside the vocabulary (e.g. J, *, digits) are mapped to X, so that no residue is
silently dropped; callers that care count them with :func:`count_unknown`.
The tokenizer.json written by :func:`build_hf_tokenizer` gives exactly the ids of
:func:`encode` for any upper-case sequence, and wraps it in ``<bos> ... <eos>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PAD, BOS, EOS, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<unk>")
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
ANOMALOUS_AMINO_ACIDS = "BOUXZ"
RESIDUES = STANDARD_AMINO_ACIDS + ANOMALOUS_AMINO_ACIDS
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + tuple(RESIDUES)
VOCAB_SIZE = len(VOCAB)
FIRST_RESIDUE_ID = len(SPECIAL_TOKENS)
X_ID = VOCAB.index("X")

#: Byte -> id lookup; lower case is accepted, anything else that is not a residue maps to X.
_BYTE_TO_ID = np.full(256, X_ID, dtype=np.uint8)
#: Byte -> 1 where the byte is not a residue letter (either case).
_BYTE_IS_UNKNOWN = np.ones(256, dtype=np.uint8)
for _i, _aa in enumerate(RESIDUES):
    for _byte in (ord(_aa), ord(_aa.lower())):
        _BYTE_TO_ID[_byte] = FIRST_RESIDUE_ID + _i
        _BYTE_IS_UNKNOWN[_byte] = 0
_ID_TO_BYTE = np.frombuffer(("\0" * FIRST_RESIDUE_ID + RESIDUES).encode(), dtype=np.uint8)


def encode(sequence: str | bytes) -> np.ndarray:
    """Residue letters -> uint8 token ids (no special tokens). Shape: (len(sequence),)."""
    data = sequence.encode("ascii", "replace") if isinstance(sequence, str) else sequence
    return _BYTE_TO_ID[np.frombuffer(data, dtype=np.uint8)]


def encode_bytes_array(residues: np.ndarray) -> np.ndarray:
    """Vectorised :func:`encode` for a uint8 array of ASCII residue letters."""
    return _BYTE_TO_ID[residues]


def count_unknown(sequence: str | bytes | np.ndarray) -> int:
    """Number of letters that :func:`encode` maps to X because they are not in the vocabulary."""
    if isinstance(sequence, np.ndarray):
        data = sequence
    else:
        raw = sequence.encode("ascii", "replace") if isinstance(sequence, str) else sequence
        data = np.frombuffer(raw, dtype=np.uint8)
    return int(_BYTE_IS_UNKNOWN[data].sum())


def decode(ids: np.ndarray | list[int]) -> str:
    """Token ids -> residue letters; special tokens are dropped."""
    array = np.asarray(ids, dtype=np.int64)
    array = array[array >= FIRST_RESIDUE_ID]
    return _ID_TO_BYTE[array].tobytes().decode("ascii")


def batch_encode(
    sequences: Sequence[str | bytes | np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Proteins as one batch of model inputs: ``<bos> residues <eos>``, padded on the right.

    Strings are encoded with :func:`encode`; arrays are residue ids already (no special tokens).
    Returns tokens (B, L_max + 2) int64 and padding_mask (B, L_max + 2) bool, True at padding,
    or None when no row is padded (exact attention then takes its fused path).
    """
    import torch

    ids = [s if isinstance(s, np.ndarray) else encode(s) for s in sequences]
    length = max(len(s) for s in ids) + 2
    tokens = torch.full((len(ids), length), PAD, dtype=torch.long)
    for row, residues in enumerate(ids):
        tokens[row, 0] = BOS
        tokens[row, 1 : len(residues) + 1] = torch.from_numpy(residues.astype(np.int64))
        tokens[row, len(residues) + 1] = EOS
    padding = tokens == PAD
    return tokens, (padding if bool(padding.any()) else None)


def build_hf_tokenizer():
    """A `tokenizers.Tokenizer` that reproduces :func:`encode` and adds ``<bos>``/``<eos>``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Letters outside the vocabulary become X, as in `encode`; special tokens bypass normalisation.
    lower_to_upper = [normalizers.Replace(aa.lower(), aa) for aa in RESIDUES]
    tokenizer.normalizer = normalizers.Sequence(
        [*lower_to_upper, normalizers.Replace(Regex(f"[^{RESIDUES}]"), "X")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    tokenizer.enable_padding(pad_id=PAD, pad_token="<pad>")
    return tokenizer


def save_tokenizer_json(path: str | Path) -> Path:
    """Write tokenizer.json to ``path`` (atomically) and return the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    build_hf_tokenizer().save(str(tmp))
    tmp.replace(path)
    return path
