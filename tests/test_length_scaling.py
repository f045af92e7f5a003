"""benchmarks/length_scaling.py, the speed figure's harness, on a tiny model: a curve ends where
its step crosses the memory budget, each kernel's model is the one named, and the decoding
states are the sizes they should be."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "length_scaling.py"
BUDGET_GB = 0.55
TINY = ["--layers", "1", "--dim", "64", "--heads", "2", "--ff-dim", "128", "--num-features", "16"]


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports embed_generate beside it
    spec = importlib.util.spec_from_file_location("length_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


def test_curves_end_at_the_memory_budget_and_the_tables_say_so(script, tmp_path, monkeypatch):
    contenders = ["exact (materialized), bidirectional", "FAVOR+ ReLU, bidirectional"]
    # The budget leaves FAVOR+ several sequences above a process that imports torch (0.25 to
    # 0.35 GB, depending on the environment) while the materialized 4,096 x 4,096 step needs more.
    argv = [*TINY, "--max-length", "4096", "--budget-gb", f"{BUDGET_GB}", "--no-decode",
            "--concat-length", "4096", "--out", str(tmp_path), "--contenders", *contenders]  # fmt: skip
    assert script.main(argv) == 0
    written = json.loads((tmp_path / "length_scaling.json").read_text())
    materialized, favor = (written["curves"][name] for name in contenders)
    # The L x L matrices outgrow the budget; FAVOR+'s memory hardly moves.
    assert materialized["ended"] == "memory" and materialized["longest"] in (1024, 2048)
    assert favor["ended"] == "the longest length asked for" and favor["longest"] == 4096
    peaks = {int(length): point["peak_bytes"] for length, point in favor["points"].items()}
    assert max(peaks.values()) < BUDGET_GB * script.GB
    assert peaks[4096] - peaks[1024] < 0.1 * script.GB
    table = (tmp_path / "length_scaling.md").read_text()
    assert f"| {contenders[0]} | {materialized['longest']:,} |" in table
    assert table.count("| memory |") == 1
    assert (tmp_path / "length_scaling.png").read_bytes()[:4] == b"\x89PNG"

    # The concat table: nothing fits for the L x L matrices; FAVOR+'s largest batch was run and
    # fits, one more went over, and memory grows with the batch.
    concat = written["concat"]
    assert concat[contenders[0]]["largest"] == 0
    row = concat[contenders[1]]
    largest = row["largest"]
    assert largest > 2 and row["limit"] == "memory"
    assert row["runs"][:2] == [[1, True], [2, True]]
    assert [largest, True] in row["runs"] and [largest + 1, False] in row["runs"]
    records = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    by_batch = {json.loads(r["key"])[2]: r["result"] for r in records
                if json.loads(r["key"])[:2] == [contenders[1], 4096]}  # fmt: skip
    assert by_batch[largest]["peak_bytes"] <= BUDGET_GB * script.GB
    assert by_batch[1]["peak_bytes"] < by_batch[2]["peak_bytes"] < by_batch[largest]["peak_bytes"]
    assert f"| {contenders[1]} | {by_batch[1]['peak_bytes'] / script.GB:.2f} |" in table

    # A rerun measures nothing again: every point comes from points.jsonl.
    def no_new_measurements(*args):
        raise AssertionError(f"measured again: {args[1:]}")

    monkeypatch.setattr(script, "_run_worker", no_new_measurements)
    (tmp_path / "length_scaling.md").unlink()
    assert script.main(argv) == 0
    assert (tmp_path / "length_scaling.md").read_text() == table


@pytest.mark.parametrize(
    "contender",
    ["OPT", "exact (materialized), causal", "Reformer, causal", "Linformer, bidirectional"],
)
def test_each_contender_builds_the_model_it_names(script, contender):
    args = script.parse_args(TINY)
    kernel, causal = script.CONTENDERS[contender]
    model = script.build_model(args, kernel, causal, 256)
    attention = model.blocks[0].attn.attention
    assert model.config.causal == causal
    tokens = torch.randint(5, 30, (1, 256))
    if kernel in ("opt", "materialized"):
        q, k, v = torch.randn(3, 1, 2, 8, 32).unbind(0)
        out = attention(q, k, v)
        if kernel == "opt":
            assert torch.equal(out, v)
        else:  # the paper's softmax(QK^T)V, as PyTorch's fused kernel computes it
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.testing.assert_close(out, want)
    else:
        assert model.config.kernel == kernel
    assert model(tokens)["logits"].shape == (1, 256, 30)


def test_decoding_states_are_constant_for_favor_and_linear_for_the_cache(
    script, tmp_path, monkeypatch
):
    # 3 MB: a step holds the cache twice (it is copied to append a token), so 2,048 is the last
    # position that fits (2 x 1 MB) and 4,096 (2 x 2 MB) is over.
    argv = [*TINY, "--max-decode-position", "8192", "--decode-seconds", "0", "--budget-gb",
            "0.003", "--out", str(tmp_path)]  # fmt: skip
    curves = script.decoding_curve(script.parse_args(argv))
    favor = {p: point["state_bytes"] for p, point in curves["FAVOR+ softmax"].items()}
    cache = {p: point["state_bytes"] for p, point in curves["exact, KV cache"].items()}
    assert sorted(favor) == [1024, 2048, 4096, 8192] and len(set(favor.values())) == 1
    assert sorted(cache) == [1024, 2048]
    for position, size in cache.items():
        assert size == 1 * 2 * position * 64 * 4  # layers x (keys, values) x L x d x float32
    assert all(point["tokens_per_s"] > 0 for c in curves.values() for point in c.values())

    # A rerun reads every point back from points.jsonl.
    monkeypatch.setattr(script, "_decode_point", lambda *args: pytest.fail(f"measured {args[1:]}"))
    assert script.decoding_curve(script.parse_args(argv)) == curves
