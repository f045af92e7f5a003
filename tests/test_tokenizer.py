"""The alphabet: golden ids, round trips, and the tokenizer.json agreeing with protperf's encoder."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from tokenizers import Tokenizer

from protperf import tokenizer as tok


def test_golden_ids():
    assert tok.VOCAB_SIZE == 30
    assert (tok.PAD, tok.BOS, tok.EOS, tok.MASK, tok.UNK) == (0, 1, 2, 3, 4)
    np.testing.assert_array_equal(tok.encode("ACDY"), [5, 6, 7, 24])
    np.testing.assert_array_equal(tok.encode("BOUXZ"), [25, 26, 27, 28, 29])
    assert tok.encode("MKT").dtype == np.uint8


def test_lowercase_and_unknown_letters_map_to_x():
    np.testing.assert_array_equal(tok.encode("mkt"), tok.encode("MKT"))
    assert tok.decode(tok.encode("MJ*K")) == "MXXK"
    assert tok.count_unknown("MJ*K") == 2
    assert tok.count_unknown("MXK") == 0  # X is a residue letter, not an unknown one


def test_decode_drops_special_tokens():
    ids = [tok.BOS, *tok.encode("MKV").tolist(), tok.EOS, tok.PAD]
    assert tok.decode(ids) == "MKV"


def test_tokenizer_json_reproduces_ids(tmp_path, proteome_dir):
    path = tok.save_tokenizer_json(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(path))
    with gzip.open(proteome_dir / "UP000000625-E.coli.fasta.gz", "rt") as handle:
        sequences, current = [], []
        for line in handle:
            if line.startswith(">"):
                if current:
                    sequences.append("".join(current))
                current = []
                if len(sequences) == 200:
                    break
            else:
                current.append(line.strip())
    sequences.append("MKTJ*ublx")  # unknown letters and lower case
    for sequence in sequences:
        expected = [tok.BOS, *tok.encode(sequence.upper()).tolist(), tok.EOS]
        assert hf.encode(sequence.upper()).ids == expected
        assert hf.decode(expected).replace(" ", "") == tok.decode(expected)


@pytest.mark.parametrize("token", tok.SPECIAL_TOKENS)
def test_tokenizer_json_keeps_special_tokens_whole(tmp_path, token):
    hf = tok.build_hf_tokenizer()
    ids = hf.encode(f"MK{token}A").ids
    assert ids == [
        tok.BOS,
        *tok.encode("MK").tolist(),
        tok.VOCAB.index(token),
        tok.encode("A")[0],
        tok.EOS,
    ]
