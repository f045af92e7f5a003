"""The packaged model: its numbers on real proteins are pinned, its card is complete, and the
verbs fall back to it when there is no --model and no run."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from lm_data import ecoli_fasta, read_fasta

from protperf import cli, load_model, tokenizer
from protperf.pretrained import DEFAULT_PACKAGED, PACKAGED_DIR, packaged_models

#: Of the first three E. coli proteins of the shared proteomes: the mean next-token
#: log-likelihood per predicted token (nats) and the first four dimensions of the mean final
#: hidden state over residues. Computed once from the packaged weights; a change to the model
#: code or the weights that moves them fails here.
GOLDEN_LOG_LIKELIHOOD = [-2.923913, -2.727091, -2.84901]
GOLDEN_EMBEDDING = [
    [0.010974, -0.050221, -0.004557, 0.251193],
    [0.046695, -0.098077, -0.001873, 0.099984],
    [-0.039972, -0.030846, -0.024088, -0.125361],
]
#: float32 sums in another order (another CPU, another thread count) move the last digits only.
TOLERANCE = 1e-4


def first_proteins(proteome_dir, count: int = 3) -> list[str]:
    source = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    return [sequence for _, sequence in read_fasta(source, count)]


def packaged_outputs(proteins: list[str]) -> tuple[list[float], list[list[float]]]:
    """(mean next-token log-likelihood of each protein, first 4 dims of its mean embedding)."""
    model = load_model(DEFAULT_PACKAGED)
    depth = model.config.depth
    tokens, padding = tokenizer.batch_encode(proteins)
    with torch.no_grad():
        out = model(tokens, padding, repr_layers=[depth])
    log_probs = out["logits"][:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    predicted = ~padding[:, 1:]
    likelihood = (log_probs * predicted).sum(1) / predicted.sum(1)
    states = out["representations"][depth]
    embeddings = [states[i, 1 : len(p) + 1].mean(0)[:4].tolist() for i, p in enumerate(proteins)]
    return likelihood.tolist(), embeddings


def test_packaged_model_outputs_are_pinned(proteome_dir):
    likelihood, embeddings = packaged_outputs(first_proteins(proteome_dir))
    assert likelihood == pytest.approx(GOLDEN_LOG_LIKELIHOOD, abs=TOLERANCE)
    for got, want in zip(embeddings, GOLDEN_EMBEDDING, strict=True):
        assert got == pytest.approx(want, abs=TOLERANCE)


def test_packaged_model_is_small_causal_and_has_its_card():
    folder = packaged_models()[DEFAULT_PACKAGED]
    assert folder.parent == PACKAGED_DIR
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size < 10e6
    config = json.loads((folder / "config.json").read_text())
    assert config["mode"] == "unidirectional" and config["model"]["causal"] is True
    card = (folder / "MODEL_CARD.md").read_text()
    for needed in ("protperf prepare-data", "protperf train", "unigram", "OOD", "wall"):
        assert needed in card, needed


def test_embed_falls_back_to_the_packaged_model(proteome_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ids = ecoli_fasta(proteome_dir, tmp_path / "sequences.fasta", 3)
    assert cli.main(["embed", "sequences.fasta"]) == 0
    err = capsys.readouterr().err
    assert f"using the packaged model {DEFAULT_PACKAGED} (no --model given" in err
    proteins = first_proteins(proteome_dir)
    _, embeddings = packaged_outputs(proteins)
    with h5py.File(tmp_path / "sequences.h5") as f:
        assert list(f["ids"].asstr()[:]) == ids
        for row, want in zip(f["mean"][:], embeddings, strict=True):
            assert row[:4].tolist() == pytest.approx(want, abs=TOLERANCE)
