"""Reformer's LSH attention and Linformer: against the published implementations
(reformer-pytorch, linformer) with the same weights and rotations, against the naive form of the
paper's equations, and for causality, padding, gradients and the model around them."""

from __future__ import annotations

import pytest
import torch

from protperf.attention import FastAttention
from protperf.baselines import draw_rotations, linformer_attention, lsh_attention
from protperf.baselines.reference import naive_lsh_attention
from protperf.model import PerformerConfig, PerformerLM

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _rows(rows: int, length: int, dim: int, *, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(rows, length, dim, generator=generator, dtype=dtype)
    v = torch.randn(rows, length, dim, generator=generator, dtype=dtype)
    return qk, v


def _right_padding(lengths: list[int], length: int) -> torch.Tensor:
    """(N, L) bool, True at the first lengths[i] positions of row i."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_hashes", "bucket_size"), [(1, 4), (3, 4), (2, 8)])
def test_lsh_equals_the_naive_equations(causal, n_hashes, bucket_size):
    # Lengths that are and are not multiples of the bucket size, a row of one chunk, and one
    # whose buckets outnumber another's in the same batch.
    lengths = [37, 64, 5, 50]
    qk, v = _rows(len(lengths), 64, 8, seed=1)
    valid = _right_padding(lengths, 64)
    rotations = draw_rotations(8, n_hashes, 8, seed=3).double()
    got = lsh_attention(qk, v, rotations, bucket_size=bucket_size, causal=causal, valid=valid)
    want = naive_lsh_attention(
        qk, v, rotations, bucket_size=bucket_size, causal=causal, valid=valid
    )
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 4])
def test_lsh_equals_reformer_pytorch_with_the_same_rotations(causal, n_hashes):
    reformer = pytest.importorskip("reformer_pytorch.reformer_pytorch")
    batch, length, dim, bucket_size = 3, 128, 16, 16
    # float64: in float32 a query that sees only copies of itself has a log-sum-exp near the
    # -5e4 self logit, where reformer-pytorch's rounding moves its output by about 1e-3.
    qk, v = _rows(batch, length, dim, seed=2)
    theirs = reformer.LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal).eval()
    torch.manual_seed(7)  # the draw reformer-pytorch makes inside its forward pass
    want, _, their_buckets = theirs(qk, v)
    torch.manual_seed(7)
    rotations = torch.randn(1, dim, n_hashes, length // bucket_size // 2, dtype=qk.dtype)[0]
    got = lsh_attention(qk, v, rotations, bucket_size=bucket_size, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # Not a coincidence of averaging: the positions really fall into several buckets.
    assert their_buckets.unique().numel() > n_hashes * 4


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_output_of_a_row_does_not_depend_on_its_padding(causal):
    qk, v = _rows(2, 100, 8, seed=4)
    rotations = draw_rotations(8, 2, 4, seed=5).double()
    valid = _right_padding([100, 41], 100)
    padded = lsh_attention(qk, v, rotations, bucket_size=8, causal=causal, valid=valid)
    alone = lsh_attention(qk[1:, :41], v[1:, :41], rotations, bucket_size=8, causal=causal)
    torch.testing.assert_close(padded[1, :41], alone[0], rtol=1e-12, atol=1e-12)
    # Padding a short row changes neither its buckets nor its chunks; a longer one would.
    longer = lsh_attention(qk[1:, :60], v[1:, :60], rotations, bucket_size=8, causal=causal)
    assert not torch.allclose(longer[0, :41], alone[0])


def test_causal_lsh_never_reads_a_later_value():
    qk, v = _rows(4, 96, 8, seed=6)
    rotations = draw_rotations(8, 4, 4, seed=7).double()
    before = lsh_attention(qk, v, rotations, bucket_size=8, causal=True)
    for t in (0, 17, 50, 94):
        changed = v.clone()
        changed[:, t + 1 :] = 1e6 * torch.randn_like(changed[:, t + 1 :])
        after = lsh_attention(qk, changed, rotations, bucket_size=8, causal=True)
        assert torch.equal(after[:, : t + 1], before[:, : t + 1])
        # A bidirectional one reads them all.
        both = lsh_attention(qk, changed, rotations, bucket_size=8, causal=False)
        assert not torch.allclose(both[:, : t + 1], before[:, : t + 1])


def test_later_keys_move_earlier_outputs_through_the_chunks():
    """The leak LSH attention keeps: later positions' hashes decide which earlier keys share a
    chunk with an earlier query. Measured here, explained in docs/design.md."""
    qk, v = _rows(8, 128, 8, seed=8)
    rotations = draw_rotations(8, 4, 8, seed=9).double()
    before = lsh_attention(qk, v, rotations, bucket_size=16, causal=True)
    changed = qk.clone()
    changed[:, 64:] = torch.randn_like(changed[:, 64:])
    after = lsh_attention(changed, v, rotations, bucket_size=16, causal=True)
    moved = (after[:, :64] - before[:, :64]).norm(dim=-1) / before[:, :64].norm(dim=-1)
    assert (moved > 1e-3).float().mean() > 0.2  # many past outputs move...
    assert moved.median() < 1.0  # ...by less than their own size, typically


def test_lsh_gradients_match_finite_differences():
    qk, v = _rows(2, 24, 4, seed=10)
    qk.requires_grad_(True)
    v.requires_grad_(True)
    rotations = draw_rotations(4, 2, 2, seed=11).double()
    valid = _right_padding([24, 17], 24)

    def run(qk, v):
        out = lsh_attention(qk, v, rotations, bucket_size=4, causal=True, valid=valid)
        return out * valid[..., None]

    # eps far below the margin of any bucket's argmax: hashing is piecewise constant.
    assert torch.autograd.gradcheck(run, (qk, v), eps=1e-7, atol=1e-6)


def test_rotations_extend_instead_of_being_redrawn():
    short, long = draw_rotations(8, 2, 10, seed=1), draw_rotations(8, 2, 70, seed=1)
    assert short.shape[-1] < long.shape[-1]
    assert torch.equal(long[..., : short.shape[-1]], short)
    assert not torch.equal(draw_rotations(8, 2, 10, seed=2), short)


def _linformer_inputs(length: int, *, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, length, 32, generator=generator)


def test_linformer_equals_the_linformer_package_with_the_same_weights():
    package = pytest.importorskip("linformer")
    torch.manual_seed(0)
    theirs = package.LinformerSelfAttention(dim=32, seq_len=64, k=16, heads=4).eval()
    x = _linformer_inputs(50, seed=1)  # shorter than n: both use the first rows of E and F

    def heads(t):
        return t.view(2, 50, 4, 8).transpose(1, 2)

    q, k, v = heads(theirs.to_q(x)), heads(theirs.to_k(x)), heads(theirs.to_v(x))
    out = linformer_attention(q, k, v, theirs.proj_k, theirs.proj_v)
    got = theirs.to_out(out.transpose(1, 2).reshape(2, 50, 32))
    torch.testing.assert_close(got, theirs(x), rtol=1e-5, atol=1e-6)


def test_linformer_is_padding_invariant_and_has_gradients():
    attention = FastAttention(head_dim=8, kernel="linformer", max_length=40, linformer_k=8).double()
    q, k, v = torch.randn(3, 2, 2, 40, 8, dtype=torch.float64).unbind(0)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 23:] = True
    out = attention(q, k, v, key_padding_mask=pad)
    alone = attention(q[1:, :, :23], k[1:, :, :23], v[1:, :, :23])
    torch.testing.assert_close(out[1, :, :23], alone[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[1, :, 23:], torch.zeros_like(out[1, :, 23:]))
    out.square().sum().backward()
    assert attention.proj_k.grad[23:].abs().sum() > 0  # the full row reaches every position
    inputs = tuple(t[:1, :, :12].clone().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: attention(*t), inputs)


def test_linformer_refuses_causality_and_longer_inputs():
    with pytest.raises(ValueError, match="Linformer kernel has no causal form"):
        PerformerConfig(dim=32, depth=1, heads=4, kernel="linformer", causal=True)
    model = PerformerLM(PerformerConfig(dim=32, depth=1, heads=4, ff_dim=64, max_length=16,
                                        kernel="linformer", linformer_k=4))  # fmt: skip
    assert model.config.length_limit == (16, "Linformer projections")
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the Linformer projections' 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_reformer_model_shares_queries_and_keys_and_redraws_its_rotations():
    config = PerformerConfig(dim=32, depth=2, heads=4, ff_dim=64, kernel="reformer", causal=True,
                             lsh_bucket_size=8, lsh_hashes=2, dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = PerformerLM(config)
    exact = PerformerLM(PerformerConfig(**{**config.to_dict(), "kernel": "exact"}))
    # One projection fewer per layer: the keys are the (normalised) queries.
    assert exact.num_parameters() - model.num_parameters() == 2 * (32 * 32 + 32)
    tokens = torch.randint(5, 30, (2, 70))
    first = model(tokens)["logits"]
    assert torch.equal(model(tokens)["logits"], first)  # the rotations are fixed between redraws
    model.redraw_features(123)
    assert not torch.allclose(model(tokens)["logits"], first)
    seeds = {int(block.attn.attention.rotation_seed) for block in model.blocks}
    assert len(seeds) == 2  # each layer its own rotations
    state = model.state_dict()
    restored = PerformerLM(config)
    restored.load_state_dict(state)
    assert torch.equal(restored(tokens)["logits"], model(tokens)["logits"])
    with pytest.raises(RuntimeError, match="cannot decode one token at a time"):
        model.decode_step(tokens[:, 0], None, 0)


def _train(data, run_dir, *extra):
    from lm_models import TINY_TRAIN_ARGS

    from protperf import cli

    args = ["train", "--data", str(data), "--run-dir", str(run_dir), *TINY_TRAIN_ARGS]
    args += ["--trainer.max_steps=8", "--no-test", "--model.lsh_bucket_size=8", *extra]
    return cli.main(args)


def test_both_kernels_train_evaluate_export_and_embed_from_the_command_line(
    tiny_lm_data, proteome_dir, tmp_path, capsys
):
    import gzip
    import json

    import h5py

    from protperf import cli, load_model
    from protperf.fasta import read_fasta

    fasta = tmp_path / "proteins.fasta"
    with gzip.open(sorted(proteome_dir.glob("*E.coli*"))[0], "rt") as handle:
        fasta.write_text("".join(handle.readlines()[:40]))
    records, _ = read_fasta(fasta)
    short = tmp_path / "short.fasta"
    short.write_text("".join(f">{r.id}\n{r.sequence[:60]}\n" for r in records))
    for kernel, mode in (("reformer", []), ("reformer", ["--bidirectional"]),
                         ("linformer", ["--bidirectional", "--model.linformer_k=16"])):  # fmt: skip
        run = tmp_path / f"{kernel}{len(mode)}"
        assert _train(tiny_lm_data, run, f"--model.kernel={kernel}", *mode) == 0
        capsys.readouterr()
        assert cli.main(["evaluate", "--model", str(run), "--data", str(tiny_lm_data),
                         "--split", "test", "--format", "json"]) == 0  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert (report["model_name"], report["kernel"]) == (kernel.capitalize(), kernel)
        assert report["splits"]["test"]["model"]["perplexity"] < 30  # no worse than 30 residues
        export = tmp_path / f"{run.name}-export"
        assert cli.main(["export", str(run), str(export)]) == 0
        loaded = load_model(export)
        assert loaded.config.kernel == kernel
        out = tmp_path / f"{run.name}.h5"
        # Linformer reads at most max_length tokens: the whole proteins are refused, in one line.
        given = short if kernel == "linformer" else fasta
        assert cli.main(["embed", str(given), "--model", str(export), "-o", str(out)]) == 0
        with h5py.File(out) as f:
            assert f["mean"].shape == (len(records), 32)
            assert torch.isfinite(torch.from_numpy(f["mean"][:])).all()
    capsys.readouterr()
    refused = tmp_path / "refused.h5"
    assert cli.main(["embed", str(fasta), "--model", str(export), "-o", str(refused)]) == 1
    longest = max(range(len(records)), key=lambda i: len(records[i].sequence))
    assert capsys.readouterr().err == (
        f"protperf embed: error: {fasta}: record {longest + 1} ({records[longest].id!r}) has "
        f"{len(records[longest].sequence)} residues; this model's Linformer projections read at "
        "most 62\n"
    )
    assert not refused.exists()
    assert cli.main(["generate", "--model", str(tmp_path / "reformer0"), "-n", "1"]) == 1
    assert "Reformer kernel cannot decode one token at a time" in capsys.readouterr().err


def test_a_causal_linformer_is_a_one_line_error_before_anything_is_written(
    tiny_lm_data, tmp_path, capsys
):
    run = tmp_path / "run"
    assert _train(tiny_lm_data, run, "--model.kernel=linformer") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Linformer kernel has no causal form" in err
    assert not run.exists()


def test_the_leak_benchmark_sees_no_future_in_favor_and_some_in_reformer():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reformer_leak.py"
    spec = importlib.util.spec_from_file_location("reformer_leak", path)
    leak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(leak)
    proteins = [torch.randint(5, 30, (n,)) for n in (90, 130, 200)]
    results = {}
    for kernel in ("relu", "reformer"):
        torch.manual_seed(0)
        config = PerformerConfig(dim=32, depth=2, heads=4, ff_dim=64, kernel=kernel, causal=True,
                                 lsh_bucket_size=8, dropout=0.0)  # fmt: skip
        results[kernel] = leak.measure(PerformerLM(config).eval(), proteins, 6, seed=1)
    for key in ("vs_swapped", "vs_prefix"):  # a causal kernel: the same loss to rounding
        assert abs(results["relu"][key][0]) < 1e-6
    assert results["relu"]["moved_fraction"] == 0.0
    assert results["reformer"]["moved_fraction"] > 0.5
    # An untrained Reformer's loss moves with the swap, in both directions.
    assert results["reformer"]["vs_swapped"][1] > 1e-4
    assert results["reformer"]["loss_swapped"] != results["reformer"]["loss_whole"]
