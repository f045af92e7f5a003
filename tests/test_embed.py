"""`protperf embed`: real proteome sequences, the HDF5 layout, batch invariance, a 30,000-residue
protein, and every bad input failing with a message that names the file and the record."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from lm_models import export_random_model

from protperf import __version__, cli, load_model
from protperf.embed import embed_tokens, resolve_layers, token_budget_batches
from protperf.inference import weights_fingerprint
from protperf.tokenizer import encode

pytestmark = pytest.mark.usefixtures("single_torch_thread")
NUM_PROTEINS = 24


def read_records(path: Path, limit: int) -> list[tuple[str, str]]:
    from Bio import SeqIO

    with gzip.open(path, "rt") as handle:
        return [(r.id, str(r.seq)) for r in itertools.islice(SeqIO.parse(handle, "fasta"), limit)]


def write_fasta(path: Path, records: list[tuple[str, str]], *, gz: bool = False) -> Path:
    text = "".join(f">{name} some description\n{seq}\n" for name, seq in records)
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def proteins(proteome_dir) -> list[tuple[str, str]]:
    """Real E. coli proteins, with their FASTA ids, in file order."""
    fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    return read_records(fasta, NUM_PROTEINS)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed-models")
    return {
        "bi-softmax": export_random_model(root / "bi-softmax", kernel="softmax"),
        "bi-exact": export_random_model(root / "bi-exact", kernel="exact"),
        "uni-relu": export_random_model(root / "uni-relu", kernel="relu", causal=True),
    }


def run_embed(*args: object) -> int:
    return cli.main(["embed", *(str(a) for a in args)])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_embed_proteome_layout_order_and_values(proteins, models, tmp_path):
    fasta = write_fasta(tmp_path / "proteins.fasta.gz", proteins, gz=True)
    out = tmp_path / "embeddings.h5"
    args = ["--model", models["bi-softmax"], "-o", out, "--per-residue", "--layers", "0", "-1"]
    assert run_embed(fasta, *args, "--tokens-per-batch", 3000) == 0
    model = load_model(models["bi-softmax"])
    config = model.config
    lengths = np.array([len(seq) for _, seq in proteins])
    with h5py.File(out) as f:
        assert list(f["ids"].asstr()[:]) == [name for name, _ in proteins]  # FASTA order
        assert f["descriptions"].asstr()[0] == f"{proteins[0][0]} some description"
        assert f["mean"].shape == (NUM_PROTEINS, 2, config.dim) and f["mean"].dtype == np.float32
        assert f["residues"].shape == (lengths.sum(), 2, config.dim)
        assert f["residues"].dtype == np.float32
        np.testing.assert_array_equal(f["offsets"][:], np.concatenate([[0], np.cumsum(lengths)]))
        assert list(f.attrs["layers"]) == [0, config.depth]
        assert f.attrs["protperf_version"] == __version__
        assert f.attrs["model_id"] == weights_fingerprint(model)
        assert f.attrs["mode"] == "bidirectional" and f.attrs["num_residues"] == lengths.sum()
        residues, offsets, mean = f["residues"][:], f["offsets"][:], f["mean"][:]
    for i, (_, sequence) in enumerate(proteins):
        rows = residues[offsets[i] : offsets[i + 1]]
        # The mean is over the protein's residues only; layer 0 is the token embedding itself.
        np.testing.assert_allclose(mean[i], rows.mean(axis=0), rtol=1e-5, atol=1e-6)
        token_embedding = model.embed.weight[torch.from_numpy(encode(sequence).astype(np.int64))]
        np.testing.assert_allclose(rows[:, 0], token_embedding.detach().numpy(), atol=1e-7)
    assert np.abs(mean[:, 1]).sum() > 0 and not np.allclose(mean[0, 1], mean[1, 1])
    assert leftovers(tmp_path) == []


def test_token_budget_batches_are_longest_first_and_within_budget():
    lengths = [5, 40, 12, 300, 7, 12, 90]
    batches = token_budget_batches(lengths, 100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0] == [3]  # longer than the budget: alone
    for batch in batches[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 100
    assert resolve_layers([-1, 0, 2, -3], depth=2) == [2, 0]


@pytest.mark.parametrize("name", ["bi-softmax", "bi-exact", "uni-relu"])
def test_batched_equals_one_at_a_time(proteins, models, name):
    """Padding invariance: a protein's embedding does not depend on its batch (to 1e-5)."""
    model = load_model(models[name])
    config = model.config
    sequences = [encode(seq) for _, seq in proteins]
    layers = [1, config.depth]

    def run(budget: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        items = embed_tokens(
            model, sequences, layers=layers, tokens_per_batch=budget, per_residue=True
        )
        return {index: (mean, residues) for index, mean, residues in items}

    lengths = [len(s) + 2 for s in sequences]
    assert len(token_budget_batches(lengths, 1)) == len(sequences)
    assert min(len(b) for b in token_budget_batches(lengths, 10**6)) == len(sequences)
    alone, together = run(1), run(10**6)  # one at a time / all in one heavily padded batch
    for index in range(len(sequences)):
        torch.testing.assert_close(together[index][0], alone[index][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[index][1], alone[index][1], atol=1e-5, rtol=0)


def test_a_30000_residue_protein_embeds_whole(models, proteins, tmp_path):
    rng = np.random.default_rng(0)
    long = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=30_000))
    records = [proteins[0], ("giant", long), proteins[1]]
    out = tmp_path / "long.h5"
    fasta = write_fasta(tmp_path / "long.fasta", records)
    assert run_embed(fasta, "--model", models["bi-softmax"], "-o", out, "--per-residue") == 0
    with h5py.File(out) as f:
        offsets, residues, mean = f["offsets"][:], f["residues"], f["mean"][:]
        assert offsets[2] - offsets[1] == 30_000  # no truncation
        giant = residues[offsets[1] : offsets[2]]
        assert np.isfinite(giant).all() and np.isfinite(mean).all()
        # The tail is really computed: the last residues differ from each other and from zero.
        assert np.abs(giant[-1]).sum() > 0 and not np.allclose(giant[-1], giant[-2])
        np.testing.assert_allclose(mean[1], giant.mean(axis=0), rtol=1e-4, atol=1e-6)
    # Batched with the short proteins or alone (budget below its length): the same embedding.
    model = load_model(models["bi-softmax"])
    sequences = [encode(seq) for _, seq in records]
    alone = {i: m for i, m, _ in embed_tokens(model, sequences, layers=[2], tokens_per_batch=10)}
    batched = {
        i: m for i, m, _ in embed_tokens(model, sequences, layers=[2], tokens_per_batch=10**6)
    }
    torch.testing.assert_close(batched[1], alone[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(mean[1], alone[1][0].numpy(), atol=1e-5)


def test_lowercase_and_a_final_stop_codon_are_accepted(models, tmp_path):
    upper = write_fasta(tmp_path / "upper.fasta", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "MSK")])
    lower = write_fasta(tmp_path / "lower.fa", [("p1", "mktayiakqrqisfvkshfsrq*"), ("p2", "msK*")])
    for fasta in (upper, lower):
        assert (
            run_embed(fasta, "--model", models["bi-softmax"], "-o", fasta.with_suffix(".h5")) == 0
        )
    with h5py.File(upper.with_suffix(".h5")) as a, h5py.File(lower.with_suffix(".h5")) as b:
        np.testing.assert_array_equal(a["mean"][:], b["mean"][:])


BAD_INPUTS = {
    # name: (file content (bytes) or None for a missing file, words the error must contain)
    "missing": (None, ["no such file"]),
    "empty_file": (b"", ["no FASTA records"]),
    "not_fasta": (b"this is a text file\nwith two lines\n", ["not a FASTA file"]),
    "binary": (bytes(range(256)) * 4, ["not a FASTA"]),
    "empty_sequence": (
        b">ok\nMKT\n>hollow\n\n>ok2\nMSS\n",
        ["record 2", "'hollow'", "empty sequence"],
    ),
    "bad_letters": (b">ok\nMKT\n>gappy\nMK-T1J\n", ["record 2", "'gappy'", "'-'", "'1'", "'J'"]),
    "duplicate_ids": (b">a\nMKT\n>b\nMSS\n>a\nMQQ\n", ["duplicate id 'a'", "records 1 and 3"]),
    "truncated_gzip": (
        gzip.compress("".join(f">s{i}\nMKTAYIAK\n" for i in range(2000)).encode())[:300],
        ["truncated or corrupt gzip"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_its_error_and_writes_nothing(case, models, tmp_path, capsys):
    content, words = BAD_INPUTS[case]
    fasta = tmp_path / f"{case}.fasta"
    if content is not None:
        fasta.write_bytes(content)
    out = tmp_path / "out.h5"
    assert run_embed(fasta, "--model", models["bi-softmax"], "-o", out) == 1
    error = capsys.readouterr().err
    assert "protperf embed: error:" in error and str(fasta) in error
    for word in words:
        assert word in error, (word, error)
    assert not out.exists() and leftovers(tmp_path) == []


def test_skip_invalid_skips_and_reports(models, tmp_path, capsys):
    fasta = tmp_path / "mixed.fasta"
    fasta.write_text(">good1\nMKT\n>bad\nMK#T\n>empty\n\n>good2\nMSSHHH\n")
    out = tmp_path / "mixed.h5"
    assert run_embed(fasta, "--model", models["bi-softmax"], "-o", out, "--skip-invalid") == 0
    error = capsys.readouterr().err
    assert "record 2 ('bad')" in error and "record 3 ('empty')" in error
    with h5py.File(out) as f:
        assert list(f["ids"].asstr()[:]) == ["good1", "good2"]
        assert list(f.attrs["skipped_ids"]) == ["bad", "empty"]
        assert f["mean"].shape[0] == 2


def test_bad_options_and_a_failure_midway_leave_the_old_output(
    models, tmp_path, capsys, monkeypatch
):
    fasta = write_fasta(tmp_path / "p.fasta", [("a", "MKTAYIAK"), ("b", "MSSHHHHHHK")])
    out = tmp_path / "p.h5"
    out.write_bytes(b"previous results")
    assert run_embed(fasta, "--model", models["bi-softmax"], "-o", out) == 1
    assert capsys.readouterr().err == (
        f"protperf embed: error: -o {out}: the file exists; pass --overwrite to replace it\n"
    )
    replace = ["-o", out, "--overwrite"]
    assert run_embed(fasta, "--model", models["bi-softmax"], *replace, "--layers", "7") == 1
    assert "--layers 7" in capsys.readouterr().err
    assert run_embed(fasta, "--model", tmp_path / "no-model", *replace) == 1
    assert "no-model" in capsys.readouterr().err

    from protperf.model import PerformerLM

    calls = {"n": 0}
    forward = PerformerLM.forward

    def failing_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PerformerLM, "forward", failing_forward)
    status = run_embed(fasta, "--model", models["bi-softmax"], *replace, "--tokens-per-batch", 12)
    assert status == 130 and calls["n"] == 2
    assert out.read_bytes() == b"previous results" and leftovers(tmp_path) == []
    assert not (tmp_path / "p.h5.shards").exists()  # no shard finished: nothing to resume
    monkeypatch.setattr(PerformerLM, "forward", forward)
    assert run_embed(fasta, "--model", models["bi-softmax"], *replace) == 0
    with h5py.File(out) as f:
        assert list(f["ids"].asstr()[:]) == ["a", "b"]
