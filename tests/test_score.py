"""`protperf score`: log-likelihoods and variant effects against direct computations from the
model's logits, independence from batch composition, the output tables and every bad-mutation
message."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_models import export_random_model, tiny_config

from protperf import cli
from protperf.embed import token_budget_batches
from protperf.fasta import FastaRecord, read_fasta
from protperf.model import PerformerLM
from protperf.score import (
    Mutation,
    MutationRow,
    log_likelihoods,
    mutation_scores,
    parse_mutations,
    read_mutations,
)
from protperf.tokenizer import BOS, EOS, MASK, encode

#: Real proteins of these lengths (the first of each in the E. coli proteome), all different.
LENGTHS = range(20, 90)
COUNT = 4


@pytest.fixture(scope="module")
def proteins(proteome_dir: Path) -> list[FastaRecord]:
    """A few short real E. coli proteins of different lengths, in file order."""
    records, _ = read_fasta(proteome_dir / "UP000000625-E.coli.fasta.gz", skip_invalid=True)
    picked: dict[int, FastaRecord] = {}
    for record in records:
        if len(record.sequence) in LENGTHS and len(record.sequence) not in picked:
            picked[len(record.sequence)] = record
        if len(picked) == COUNT:
            break
    return list(picked.values())


def tiny_model(*, seed: int = 0, **overrides) -> PerformerLM:
    torch.manual_seed(seed)
    return PerformerLM(tiny_config(**overrides)).eval()


def with_specials(residues: np.ndarray) -> torch.Tensor:
    """(L + 2,) int64: <bos> residues <eos>."""
    return torch.tensor([BOS, *residues.tolist(), EOS], dtype=torch.long)


@torch.no_grad()
def direct_log_likelihood(model: PerformerLM, residues: np.ndarray) -> float:
    """sum_i log p(x_i | <bos>, x_<i) from one unbatched forward pass."""
    tokens = with_specials(residues)
    log_probs = model(tokens[None])["logits"][0].double().log_softmax(-1)
    return sum(float(log_probs[i, tokens[i + 1]]) for i in range(len(residues)))


@torch.no_grad()
def direct_masked_log_probs(model: PerformerLM, residues: np.ndarray, sites) -> torch.Tensor:
    """(len(sites), V) log-probabilities at ``sites`` (0-based) masked together, unbatched;
    with no sites, (L, V) at every residue of the unmasked protein."""
    tokens = with_specials(residues)
    tokens[[site + 1 for site in sites]] = MASK
    log_probs = model(tokens[None])["logits"][0].double().log_softmax(-1)
    return log_probs[[site + 1 for site in sites]] if sites else log_probs[1:-1]


def encoded(records: list[FastaRecord]) -> list[np.ndarray]:
    return [encode(record.sequence) for record in records]


def test_causal_log_likelihood_equals_the_logits(proteins, single_torch_thread):
    model = tiny_model(causal=True)
    sequences = encoded(proteins)
    scores = log_likelihoods(model, sequences)
    direct = [direct_log_likelihood(model, residues) for residues in sequences]
    np.testing.assert_allclose(scores, direct, rtol=0, atol=1e-4)
    assert all(score < 0 for score in scores)


def test_pseudo_log_likelihood_equals_single_masked_passes(proteins, single_torch_thread):
    model = tiny_model(kernel="relu")
    sequences = encoded(proteins[:2])
    scores = log_likelihoods(model, sequences, tokens_per_batch=1024)
    for residues, score in zip(sequences, scores, strict=True):
        direct = sum(
            float(direct_masked_log_probs(model, residues, [i])[0, residues[i]])
            for i in range(len(residues))
        )
        assert score == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {"causal": True},
        {"causal": True, "kernel": "exact", "local_conv": 3},
        {"causal": False},
        {"causal": False, "kernel": "relu", "local_conv": 4},
        {"causal": False, "kernel": "exact"},
    ],
    ids=["causal-favor", "causal-exact-conv", "masked-favor", "masked-relu-conv", "masked-exact"],
)
def test_scores_do_not_depend_on_the_batch(proteins, overrides, single_torch_thread):
    model = tiny_model(**overrides)
    sequences = encoded(proteins)
    lengths = [len(s) + 2 for s in sequences]
    assert len(set(lengths)) == len(lengths)
    assert len(token_budget_batches(lengths, 100_000)) == 1  # all of them padded into one batch
    batched = log_likelihoods(model, sequences, tokens_per_batch=100_000)
    for residues, score in zip(sequences, batched, strict=True):
        alone = log_likelihoods(model, [residues], tokens_per_batch=1)  # one pass per batch
        assert score == pytest.approx(alone[0], abs=1e-5)


def rows_for(records: list[FastaRecord], mutations: list[tuple[int, str]]) -> list[MutationRow]:
    return [
        MutationRow(records[index].id, index, text, parse_mutations(text))
        for index, text in mutations
    ]


def test_masked_marginals(proteins, single_torch_thread):
    model = tiny_model(seed=1)
    sequences = encoded(proteins[:2])
    first, second = proteins[0].sequence, proteins[1].sequence
    synonymous = f"{first[4]}5{first[4]}"
    double = f"{first[1]}2W:{first[9]}10{'A' if first[9] != 'A' else 'G'}"
    single = f"{second[2]}3{'C' if second[2] != 'C' else 'D'}"
    rows = rows_for(proteins, [(0, synonymous), (0, double), (1, single), (0, double)])
    scores = mutation_scores(model, sequences, rows, tokens_per_batch=150)
    assert set(scores) == {"masked_marginal", "wt_marginal"}
    assert scores["masked_marginal"][0] == 0.0 and scores["wt_marginal"][0] == 0.0
    assert scores["masked_marginal"][1] == scores["masked_marginal"][3]  # one pass per site set
    for row, masked, unmasked in zip(
        rows, scores["masked_marginal"], scores["wt_marginal"], strict=True
    ):
        residues = sequences[row.protein]
        sites = [m.position - 1 for m in row.mutations]
        at_sites = direct_masked_log_probs(model, residues, sites)
        wt_log_probs = direct_masked_log_probs(model, residues, [])  # (L, V), nothing masked
        expected_masked = expected_unmasked = 0.0
        for j, m in enumerate(row.mutations):
            mt, wt = int(encode(m.mutant)[0]), int(encode(m.wild_type)[0])
            expected_masked += float(at_sites[j, mt] - at_sites[j, wt])
            expected_unmasked += float(
                wt_log_probs[m.position - 1, mt] - wt_log_probs[m.position - 1, wt]
            )
        assert masked == pytest.approx(expected_masked, abs=1e-5)
        assert unmasked == pytest.approx(expected_unmasked, abs=1e-5)
    assert scores["masked_marginal"][1] != 0.0


def test_causal_log_likelihood_ratio_of_a_multi_mutant(proteins, single_torch_thread):
    model = tiny_model(seed=2, causal=True)
    sequences = encoded(proteins[:2])
    sequence = proteins[1].sequence
    new = {i: "W" if sequence[i] != "W" else "A" for i in (0, 5, len(sequence) - 1)}
    triple = ":".join(f"{sequence[i]}{i + 1}{letter}" for i, letter in new.items())
    synonymous = f"{sequence[3]}4{sequence[3]}"
    rows = rows_for(proteins, [(1, triple), (1, synonymous)])
    scores = mutation_scores(model, sequences, rows)
    assert set(scores) == {"log_likelihood_ratio"}
    mutant = list(sequence)
    for i, letter in new.items():
        mutant[i] = letter
    expected = direct_log_likelihood(model, encode("".join(mutant))) - direct_log_likelihood(
        model, sequences[1]
    )
    assert scores["log_likelihood_ratio"][0] == pytest.approx(expected, abs=1e-4)
    assert scores["log_likelihood_ratio"][0] != 0.0
    assert scores["log_likelihood_ratio"][1] == 0.0  # the wild type itself, scored once


def test_parse_mutations():
    assert parse_mutations("a12g") == (Mutation("A", 12, "G"),)
    assert parse_mutations("V30L:A12G") == (Mutation("A", 12, "G"), Mutation("V", 30, "L"))


# ---------------------------------------------------------------------------------------------
# The command: tables, and bad mutation files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score-models")
    return {
        "causal": export_random_model(root / "causal", causal=True),
        "masked": export_random_model(root / "masked"),
    }


@pytest.fixture
def fasta(proteins, tmp_path) -> Path:
    path = tmp_path / "proteins.fa"
    path.write_text("".join(f">{r.description}\n{r.sequence}\n" for r in proteins[:3]))
    return path


def read_table(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def test_score_table(fasta, proteins, models, capsys, single_torch_thread):
    assert cli.main(["score", str(fasta), "--model", str(models["causal"])]) == 0
    out = fasta.parent / "proteins.scores.csv"
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert "scored 3 proteins" in captured.err and "log-likelihood" in captured.err
    assert out.read_text().splitlines()[0] == (
        "id,length,log_likelihood,mean_log_likelihood,perplexity"
    )
    table = read_table(out)
    assert [row["id"] for row in table] == [record.id for record in proteins[:3]]
    assert all("|" in row["id"] for row in table)  # UniProt ids kept as given
    for row, record in zip(table, proteins, strict=False):
        length, total = int(row["length"]), float(row["log_likelihood"])
        assert length == len(record.sequence)
        assert float(row["mean_log_likelihood"]) == pytest.approx(total / length, abs=1e-6)
        assert float(row["perplexity"]) == pytest.approx(math.exp(-total / length), rel=1e-5)

    tsv = fasta.parent / "pll.tsv"
    argv = ["score", str(fasta), "--model", str(models["masked"]), "-o", str(tsv)]
    assert cli.main(argv) == 0
    assert "pseudo-log-likelihood" in capsys.readouterr().err
    assert tsv.read_text().splitlines()[0].split("\t")[:3] == ["id", "length", "log_likelihood"]
    assert len(read_table(tsv, "\t")) == 3

    assert cli.main(argv) == 1  # exists: --overwrite needed
    assert capsys.readouterr().err == (
        f"protperf score: error: -o {tsv}: the file exists; pass --overwrite to replace it\n"
    )
    assert cli.main([*argv, "--overwrite"]) == 0


def test_mutations_table(fasta, proteins, models, capsys, single_torch_thread):
    first = proteins[0]
    mutations = fasta.parent / "variants.csv"
    mutations.write_text(
        f"id,mutation,assay\n{first.id},{first.sequence[1]}2A,0.5\n\n"
        f"{proteins[1].id},{proteins[1].sequence[0]}1K:{proteins[1].sequence[3]}4C,1.5\n"
    )
    argv = ["score", str(fasta), "--mutations", str(mutations)]
    assert cli.main([*argv, "--model", str(models["masked"])]) == 0
    out = fasta.parent / "proteins.mutations.csv"
    assert capsys.readouterr().out == f"{out}\n"
    table = read_table(out)
    assert list(table[0]) == ["id", "mutation", "masked_marginal", "wt_marginal"]
    assert [(row["id"], row["mutation"]) for row in table] == [
        (first.id, f"{first.sequence[1]}2A"),
        (proteins[1].id, f"{proteins[1].sequence[0]}1K:{proteins[1].sequence[3]}4C"),
    ]
    out_tsv = fasta.parent / "llr.tsv"
    assert cli.main([*argv, "--model", str(models["causal"]), "-o", str(out_tsv)]) == 0
    lines = out_tsv.read_text().splitlines()
    assert lines[0] == "id\tmutation\tlog_likelihood_ratio" and len(lines) == 3
    float(lines[1].split("\t")[2])


#: name -> (mutation file text, expected message after "protperf score: error: {file}, ");
#: {seq} is the first protein's sequence, {id} its id; the bad line is line 3.
BAD_MUTATIONS = {
    "wild-type-mismatch": (
        "{id},{wrong}2A",
        "line 3: {wrong}2A: residue 2 of {id!r} is {seq[1]}, not {wrong}",
    ),
    "position-out-of-range": (
        "{id},{seq[0]}{past}A",
        "line 3: {seq[0]}{past}A: position {past} is outside {id!r} (residues 1..{length})",
    ),
    "position-zero": (
        "{id},M0A",
        "line 3: M0A: position 0 is outside {id!r} (residues 1..{length})",
    ),
    "unknown-id": ("no_such_protein,A1G", "line 3: no protein 'no_such_protein' in {fasta}"),
    "no-id": (",A1G", "line 3: no id"),
    "malformed": (
        "{id},{seq[0]}1",
        "line 3: mutation '{seq[0]}1' is not of the form A12G (wild-type letter, 1-based "
        "position, mutant letter; several joined by ':')",
    ),
    "malformed-separator": (
        "{id},{seq[0]}1A;{seq[1]}2A",
        "line 3: mutation '{seq[0]}1A;{seq[1]}2A' is not of the form A12G (wild-type letter, "
        "1-based position, mutant letter; several joined by ':')",
    ),
    "empty-mutation": (
        "{id},",
        "line 3: mutation '' is not of the form A12G (wild-type letter, 1-based position, "
        "mutant letter; several joined by ':')",
    ),
    "not-an-amino-acid": ("{id},{seq[0]}1J", "line 3: {seq[0]}1J: 'J' is not an amino-acid letter"),
    "same-position-twice": (
        "{id},{seq[0]}1A:{seq[0]}1G",
        "line 3: {seq[0]}1A:{seq[0]}1G: position 1 is mutated more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MUTATIONS))
def test_bad_mutation_is_one_line_and_writes_nothing(
    case, fasta, proteins, models, tmp_path, monkeypatch, capsys
):
    line, message = BAD_MUTATIONS[case]
    first = proteins[0]
    values = {
        "id": first.id, "seq": first.sequence, "length": len(first.sequence),
        "past": len(first.sequence) + 1, "wrong": "W" if first.sequence[1] != "W" else "C",
        "fasta": fasta,
    }  # fmt: skip
    mutations = tmp_path / "variants.csv"
    good = f"{first.id},{first.sequence[0]}1A"
    mutations.write_text(f"id,mutation\n{good}\n{line.format(**values)}\n{good}\n")
    _refuse_model_loading(monkeypatch)
    before = sorted(tmp_path.iterdir())
    status = cli.main(["score", str(fasta), "--model", str(models["masked"]),
                       "--mutations", str(mutations)])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err == f"protperf score: error: {mutations}, {message.format(**values)}\n"
    assert captured.out == ""
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,variant\np,A1G\n", ", line 1: no 'mutation' column (the header line has 'id', "
         "'variant'; needed: id, mutation)"),
        ("", ", line 1: no 'id' or 'mutation' column (the header line has nothing; needed: id, "
         "mutation)"),
        ("mutation,id\n\n", ": no mutations (a header line and nothing else)"),
    ],
    ids=["missing-column", "empty-file", "no-rows"],
)  # fmt: skip
def test_bad_mutation_file(text, message, fasta, models, tmp_path, monkeypatch, capsys):
    mutations = tmp_path / "variants.csv"
    mutations.write_text(text)
    _refuse_model_loading(monkeypatch)
    out = tmp_path / "out.csv"
    status = cli.main(["score", str(fasta), "--model", str(models["causal"]), "--mutations",
                       str(mutations), "-o", str(out)])  # fmt: skip
    assert status == 1
    assert capsys.readouterr().err == f"protperf score: error: {mutations}{message}\n"
    assert not out.exists()


def test_output_may_not_be_an_input(fasta, models, tmp_path, capsys):
    mutations = tmp_path / "variants.csv"
    mutations.write_text("id,mutation\n")
    argv = ["score", str(fasta), "--model", str(models["causal"]), "--overwrite"]
    assert cli.main([*argv, "--mutations", str(mutations), "-o", str(mutations)]) == 1
    assert capsys.readouterr().err == (
        f"protperf score: error: -o {mutations}: is the --mutations input; give another output "
        "name\n"
    )
    assert mutations.read_text() == "id,mutation\n"


def test_read_mutations_tsv(proteins, tmp_path):
    path = tmp_path / "variants.tsv"
    first = proteins[0]
    path.write_text(f"mutation\tid\n{first.sequence[2]}3G\t{first.id}\n")
    (row,) = read_mutations(path, proteins, tmp_path / "p.fasta")
    assert (row.id, row.protein, row.mutations) == (
        first.id, 0, (Mutation(first.sequence[2], 3, "G"),)
    )  # fmt: skip


def _refuse_model_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("protperf.export.read_model", refuse)
