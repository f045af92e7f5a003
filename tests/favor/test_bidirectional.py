"""Bidirectional FAVOR+ (protperf.favor.bidirectional): padding, blocks and position segments."""

from __future__ import annotations

import pytest
import torch

from protperf.attention import FastAttention
from protperf.favor import blocks
from protperf.favor.reference import random_qkv


def test_padded_key_values_do_not_leak():
    """Whatever sits in padded positions (even huge values) leaves the real outputs unchanged."""
    attn = FastAttention(head_dim=16, num_features=64, kernel="softmax")
    q, k, v = (x.detach().float() for x in random_qkv(1, 2, 50, 16, seed=8))
    mask = torch.zeros(1, 50, dtype=torch.bool)
    mask[:, 30:] = True
    out = attn(q, k, v, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] = 40.0
    v2[:, :, 30:] = 1e6
    out2 = attn(q, k2, v2, key_padding_mask=mask)
    assert torch.allclose(out, out2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_bidirectional_position_segments_equal_one_piece(monkeypatch, kernel):
    """A row too large for the block budget is summed in position segments, its stabiliser M
    raised segment by segment (keys grow along the sequence here, so it is): the output and
    gradients equal the one-piece computation, with kept and with recomputed features."""
    attn = FastAttention(head_dim=8, num_features=16, kernel=kernel, causal=False).double()
    q, k, v = random_qkv(2, 3, 23, 8, seed=13)
    k = k * torch.linspace(0.2, 3.0, 23, dtype=torch.float64).view(1, 1, 23, 1)
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[0, 17:] = True
    segment_bytes = 4 * 16 * 5  # one row of 5 positions of 16 features
    results = []
    for block_budget, keep_budget in (
        (1 << 30, 1 << 30),
        (segment_bytes, 1 << 30),
        (segment_bytes, 0),
    ):
        monkeypatch.setitem(blocks.BLOCK_BYTES, "cpu", block_budget)
        monkeypatch.setitem(blocks.KEEP_FEATURES_BYTES, "cpu", keep_budget)
        assert len(blocks._segments(23, 1, 16, q.device)) == (1 if block_budget > 1e6 else 5)
        out = attn(q, k, v, key_padding_mask=mask)
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v))))
    for one_piece, *segmented in zip(*results, strict=True):
        for other in segmented:
            assert torch.allclose(one_piece, other, atol=1e-12, rtol=0)
