"""`protperf generate`: the recurrence equals greedy decoding through the full forward pass, only
residues are emitted, sampling is seeded per sequence, and the command writes FASTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_models import export_random_model, tiny_config

from protperf import cli, load_model
from protperf.fasta import read_fasta
from protperf.generate import generate_tokens, restrict_logits, sample_next
from protperf.model import PerformerLM
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, MASK, PAD, UNK, encode

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def greedy_full_forward(model: PerformerLM, prompt: np.ndarray, max_length: int) -> list[int]:
    """Greedy decoding the slow way: the whole prefix through ``forward`` for every token."""
    tokens = [BOS, *(int(t) for t in prompt)]
    while len(tokens) - 1 < max_length:
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))["logits"][:, -1]
        allow_eos = torch.tensor([len(tokens) > 1])
        token = int(restrict_logits(logits, allow_eos).argmax(-1))
        if token == EOS:
            break
        tokens.append(token)
    return tokens[1:]


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-models")
    return {
        kernel: export_random_model(root / kernel, kernel=kernel, causal=True, seed=1)
        for kernel in ("relu", "exact")
    }


def test_greedy_recurrence_equals_the_full_forward_pass(trained_tiny_runs, random_models):
    runs = {"softmax": trained_tiny_runs["unidirectional"], **random_models}
    lengths = []
    for kernel, path in runs.items():
        model = load_model(path)
        config = model.config
        assert config.kernel == kernel and config.causal
        for prompt in ("", "MKT"):
            (fast,) = generate_tokens(
                model, num=1, prompt=encode(prompt), max_length=90, temperature=0.0
            )
            slow = greedy_full_forward(model, encode(prompt), max_length=90)
            assert fast.tokens.tolist() == slow, (kernel, prompt)
            assert fast.ended == (len(slow) < 90)
            lengths.append(len(slow))
    assert max(lengths) > 20  # long enough to mean something


@pytest.mark.parametrize("local_conv", [0, 3])
def test_decoding_logits_equal_the_forward_logits_and_the_state_stays_constant(local_conv):
    torch.manual_seed(0)
    model = PerformerLM(tiny_config(causal=True, chunk_size=16, local_conv=local_conv)).eval()
    tokens = torch.randint(FIRST_RESIDUE_ID, 30, (3, 120))
    tokens[:, 0] = BOS
    full = model(tokens)["logits"]
    states, steps, sizes = None, [], []
    for position in range(tokens.shape[1]):
        logits, states = model.decode_step(tokens[:, position], states, position)
        steps.append(logits)
        sizes.append(
            sum(s.attention.context.numel() + s.attention.value_sum.numel() for s in states)
        )
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=0)
    assert len(set(sizes)) == 1  # FAVOR+: O(1) memory per token, whatever the position
    # Dropping finished rows keeps the others' states intact.
    kept = model.select_decode_states(states, torch.tensor([2, 0]))
    nxt = torch.tensor([7, 9])
    logits, _ = model.decode_step(nxt, kept, tokens.shape[1])
    reference = model(torch.cat([tokens[[2, 0]], nxt[:, None]], dim=1))["logits"][:, -1]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


class _FavourSpecials(torch.nn.Module):
    """A head that makes the special tokens by far the most likely."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x).clone()
        logits[..., [PAD, BOS, MASK, UNK]] += 50.0
        return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0, 3.0])
def test_special_tokens_are_never_emitted(random_models, temperature):
    model = load_model(random_models["relu"])
    model.head = _FavourSpecials(model.head)
    generated = generate_tokens(model, num=6, max_length=40, temperature=temperature, seed=2)
    for sequence in generated:
        assert len(sequence.tokens) >= 1 and (sequence.tokens >= FIRST_RESIDUE_ID).all()
        assert len(sequence.tokens) <= 40 and sequence.ended == (len(sequence.tokens) < 40)


def test_sampling_is_seeded_per_sequence(trained_tiny_runs):
    model = load_model(trained_tiny_runs["unidirectional"])
    kwargs = {"prompt": encode("MS"), "max_length": 60, "temperature": 1.0, "top_p": 0.95}
    first = generate_tokens(model, num=6, seed=5, batch_size=4, **kwargs)
    again = generate_tokens(model, num=6, seed=5, batch_size=1, **kwargs)
    fewer = generate_tokens(model, num=3, seed=5, batch_size=3, **kwargs)
    other = generate_tokens(model, num=6, seed=6, batch_size=4, **kwargs)
    as_lists = [[g.tokens.tolist() for g in run] for run in (first, again, fewer, other)]
    assert as_lists[0] == as_lists[1] and as_lists[0][:3] == as_lists[2]
    assert as_lists[0] != as_lists[3]
    assert len({tuple(t) for t in as_lists[0]}) > 1  # the sequences of one run differ
    assert all(t[:2] == encode("MS").tolist() for t in as_lists[0])


def test_nucleus_sampling_keeps_only_the_top_tokens():
    logits = torch.log(torch.tensor([[0.0, 0.0, 0.5, 0.3, 0.15, 0.05]]))
    generators = [torch.Generator().manual_seed(i) for i in range(200)]
    draws = torch.cat([sample_next(logits, [g], top_p=0.7) for g in generators])
    assert set(draws.tolist()) == {2, 3}  # 0.5 + 0.3 reach 0.7; 4 and 5 are cut
    assert 0.55 < (draws == 2).float().mean() < 0.75  # renormalised: 0.5 / 0.8
    greedy = torch.cat([sample_next(logits, [g], top_p=1e-9) for g in generators[:10]])
    assert set(greedy.tolist()) == {2}


def test_the_command_writes_fasta(trained_tiny_runs, tmp_path, capsys):
    out = tmp_path / "generated.fasta"
    run = trained_tiny_runs["unidirectional"]
    args = ["generate", "--model", str(run), "-n", "5", "--prompt", "mkt", "--seed", "1"]
    assert cli.main([*args, "--max-length", "50", "--top-p", "0.9", "-o", str(out)]) == 0
    records, _ = read_fasta(out)
    assert [r.id for r in records] == [f"generated_{i}" for i in range(1, 6)]
    assert all(r.sequence.startswith("MKT") and 3 < len(r.sequence) <= 50 for r in records)
    assert all(f"length={len(r.sequence)}" in r.description for r in records)
    assert "tokens/s" in capsys.readouterr().err
    # Same seed to stdout: the same proteins.
    assert cli.main([*args, "--max-length", "50", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out == out.read_text()


def test_errors(trained_tiny_runs, tmp_path, capsys):
    bidirectional = trained_tiny_runs["bidirectional"]
    assert cli.main(["generate", "--model", str(bidirectional)]) == 1
    assert "bidirectional" in capsys.readouterr().err
    unidirectional = str(trained_tiny_runs["unidirectional"])
    assert cli.main(["generate", "--model", unidirectional, "--prompt", "MK1"]) == 1
    assert "'1'" in capsys.readouterr().err
    assert cli.main(["generate", "--model", unidirectional, "--top-p", "0"]) == 1
    assert "--top-p" in capsys.readouterr().err
    out = tmp_path / "missing-folder" / "x.fasta"
    assert cli.main(["generate", "--model", unidirectional, "-o", str(out)]) == 1
    assert "missing-folder" in capsys.readouterr().err and not out.exists()


def test_an_existing_output_is_replaced_only_with_overwrite(random_models, tmp_path, capsys):
    out = tmp_path / "generated.fasta"
    out.write_text(">earlier\nMKT\n")
    args = ["generate", "--model", str(random_models["relu"]), "-n", "2", "--max-length", "8"]
    assert cli.main([*args, "-o", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"protperf generate: error: -o {out}: the file exists; pass --overwrite to replace it\n"
    )
    assert out.read_text() == ">earlier\nMKT\n"
    assert cli.main([*args, "-o", str(out), "--overwrite"]) == 0
    records, _ = read_fasta(out)
    assert [r.id for r in records] == ["generated_1", "generated_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated.fasta"]


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_a_temperature_that_is_not_a_finite_number_is_refused(random_models, temperature, capsys):
    args = ["generate", "--model", str(random_models["relu"]), "--temperature", temperature]
    assert cli.main(args) == 1
    assert capsys.readouterr().err == (
        f"protperf generate: error: --temperature must be a finite number >= 0, "
        f"not {float(temperature)}\n"
    )
    model = load_model(random_models["relu"])
    with pytest.raises(ValueError, match="--temperature"):
        generate_tokens(model, num=1, max_length=5, temperature=float(temperature))
