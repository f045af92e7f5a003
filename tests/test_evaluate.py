"""`protperf evaluate` on tiny trained models: the Table 2 layout with the baseline rows, numbers
equal to a direct computation (sequence by sequence, unbatched) and to the run's own test metrics."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protperf import cli, load_model
from protperf.data.datamodule import EVAL_EPOCH, sample_seed
from protperf.objectives import IGNORE_INDEX, mask_tokens, sample_uniforms
from protperf.plot import read_metrics
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, VOCAB_SIZE

pytestmark = pytest.mark.usefixtures("single_torch_thread")
WHOLE = ["--max-length", "100000"]  # no crops: every sequence read whole


def evaluate_json(capsys, *args: object) -> dict:
    assert cli.main(["evaluate", *(str(a) for a in args), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def unigram_log_probs(data, *, with_eos: bool) -> np.ndarray:
    """Laplace-smoothed unigram of train.h5, computed here from scratch."""
    with h5py.File(data / "train.h5") as f:
        counts = np.bincount(f["tokens"][:], minlength=VOCAB_SIZE).astype(np.float64)
        num_sequences = len(f["offsets"]) - 1
    support = np.zeros(VOCAB_SIZE, dtype=bool)
    support[FIRST_RESIDUE_ID:] = True
    counts[EOS] = num_sequences
    support[EOS] = with_eos
    probs = np.where(support, counts + 1, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(probs / probs.sum())


def direct_scores(model, examples, log_probs) -> dict:
    """Accuracy/perplexity of the model and the baseline over (inputs, targets) 1-D examples."""
    nll = correct = 0.0
    targets_all = []
    with torch.no_grad():
        for inputs, targets in examples:
            logits = model(inputs[None])["logits"][0]
            keep = targets != IGNORE_INDEX
            nll += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            correct += (logits[keep].argmax(-1) == targets[keep]).sum().item()
            targets_all.append(targets[keep].numpy())
    targets_all = np.concatenate(targets_all)
    count = len(targets_all)
    return {
        "tokens": count,
        "model": {"accuracy": correct / count, "perplexity": math.exp(nll / count)},
        "baseline": {
            "accuracy": float(np.mean(targets_all == np.argmax(log_probs))),
            "perplexity": math.exp(-log_probs[targets_all].mean()),
        },
    }


def whole_sequences(data, split):
    with h5py.File(data / f"{split}.h5") as f:
        tokens, offsets = f["tokens"][:], f["offsets"][:]
    for i in range(len(offsets) - 1):
        residues = torch.from_numpy(tokens[offsets[i] : offsets[i + 1]].astype(np.int64))
        yield i, torch.cat([torch.tensor([BOS]), residues, torch.tensor([EOS])])


def assert_scores_equal(result: dict, expected: dict) -> None:
    assert result["tokens"] == expected["tokens"]
    for who in ("model", "baseline"):
        got, want = result[who], expected[who]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.5 / expected["tokens"])
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_unidirectional_equals_a_direct_computation(trained_tiny_runs, tiny_lm_data, capsys):
    run = trained_tiny_runs["unidirectional"]
    report = evaluate_json(capsys, "--model", run, "--data", tiny_lm_data, *WHOLE)
    assert report["mode"] == "unidirectional" and list(report["splits"]) == ["test", "ood"]
    model = load_model(run)
    log_probs = unigram_log_probs(tiny_lm_data, with_eos=True)
    for split in ("test", "ood"):
        examples = [(row[:-1], row[1:]) for _, row in whole_sequences(tiny_lm_data, split)]
        assert_scores_equal(report["splits"][split], direct_scores(model, examples, log_probs))
    # Trained a little: better than the uniform guess over 26 symbols.
    assert report["splits"]["test"]["model"]["perplexity"] < 26


def test_bidirectional_equals_a_direct_computation(trained_tiny_runs, tiny_lm_data, capsys):
    run = trained_tiny_runs["bidirectional"]
    report = evaluate_json(capsys, "--model", run, "--data", tiny_lm_data, *WHOLE, "--seed", 3)
    model = load_model(run)
    log_probs = unigram_log_probs(tiny_lm_data, with_eos=False)
    examples = []
    for i, row in whole_sequences(tiny_lm_data, "test"):
        uniforms = sample_uniforms([sample_seed(3, EVAL_EPOCH, i)], len(row))
        inputs, targets = mask_tokens(row[None], uniforms)
        examples.append((inputs[0], targets[0]))
    expected = direct_scores(model, examples, log_probs)
    assert_scores_equal(report["splits"]["test"], expected)
    residues = sum(len(row) - 2 for _, row in whole_sequences(tiny_lm_data, "test"))
    assert 0.12 < expected["tokens"] / residues < 0.18  # 15% of the residues are predicted
    # Another seed masks other residues.
    other = evaluate_json(capsys, "--model", run, "--data", tiny_lm_data, *WHOLE, "--split", "test")
    assert other["splits"]["test"]["tokens"] != expected["tokens"] or (
        other["splits"]["test"]["model"] != report["splits"]["test"]["model"]
    )


@pytest.mark.parametrize("mode", ["unidirectional", "bidirectional"])
def test_equals_the_training_runs_test_metrics(trained_tiny_runs, tiny_lm_data, capsys, mode):
    """Same crops (the model's max_length), same masks (seed 0): the numbers Lightning logged."""
    run = trained_tiny_runs[mode]
    report = evaluate_json(capsys, "--model", run, "--data", tiny_lm_data)
    logged = read_metrics(run)
    for split in ("test", "ood"):
        for metric in ("accuracy", "perplexity"):
            series = logged[f"{split}/{metric}"]
            value = series[max(series)]
            assert report["splits"][split]["model"][metric] == pytest.approx(value, rel=1e-5)


def test_table_has_the_baseline_rows_in_the_papers_layout(trained_tiny_runs, tiny_lm_data, capsys):
    run = trained_tiny_runs["unidirectional"]
    report = evaluate_json(capsys, "--model", run, "--data", tiny_lm_data)
    assert cli.main(["evaluate", "--model", str(run), "--data", str(tiny_lm_data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["type", "set", "model", "acc (%)", "ppl", "tokens"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [row[:3] for row in rows] == [
        ["UNI", "test", "empirical unigram baseline"],
        ["UNI", "test", "Performer (softmax)"],
        ["UNI", "OOD", "empirical unigram baseline"],
        ["UNI", "OOD", "Performer (softmax)"],
    ]
    order = [("test", "baseline"), ("test", "model"), ("ood", "baseline"), ("ood", "model")]
    for row, (split, who) in zip(rows, order, strict=True):
        scores = report["splits"][split][who]
        assert row[3] == f"{100 * scores['accuracy']:.2f}"
        assert row[4] == f"{scores['perplexity']:.2f}"
        assert row[5] == f"{report['splits'][split]['tokens']:,}"


def test_concat_chunks_equal_a_direct_computation(trained_tiny_runs, tiny_lm_data, capsys):
    run = trained_tiny_runs["unidirectional"]
    args = ["--model", run, "--data", tiny_lm_data, "--concat", "--split", "test", "valid"]
    report = evaluate_json(capsys, *args, "--tokens-per-batch", 300)
    model = load_model(run)
    log_probs = unigram_log_probs(tiny_lm_data, with_eos=True)
    for split in ("test", "valid"):
        with h5py.File(tiny_lm_data / f"{split}.h5") as f:
            chunks = torch.from_numpy(f["concat"][:].astype(np.int64))
        assert len(chunks) > 1
        examples = [(chunk[:-1], chunk[1:]) for chunk in chunks]
        assert_scores_equal(report["splits"][split], direct_scores(model, examples, log_probs))
        assert report["splits"][split]["items"] == len(chunks)


def test_errors_name_what_is_missing(trained_tiny_runs, tiny_lm_data, tmp_path, capsys):
    run = trained_tiny_runs["unidirectional"]
    assert cli.main(["evaluate", "--model", str(run), "--data", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
    args = ["evaluate", "--model", str(run), "--data", str(tiny_lm_data), "--split", "holdout"]
    assert cli.main(args) == 1
    assert "holdout.h5: no such file" in capsys.readouterr().err
    (tmp_path / "test.h5").write_bytes((tiny_lm_data / "test.h5").read_bytes())
    assert cli.main(["evaluate", "--model", str(run), "--data", str(tmp_path)]) == 1
    assert "train.h5 not found" in capsys.readouterr().err
