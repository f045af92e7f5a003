"""Causal FAVOR+ (protperf.favor.causal): causality, segments of chunks, and the one-token
recurrence against the chunked kernel."""

from __future__ import annotations

import pytest
import torch
from favor_cases import KERNEL_SETUPS

from protperf.attention import FastAttention
from protperf.favor import CausalFavor, blocks, causal_step
from protperf.favor.reference import random_qkv


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
def test_causal_has_no_future_gradient(kernel, feature_type):
    attn = FastAttention(
        head_dim=8,
        num_features=16,
        kernel=kernel,
        causal=True,
        feature_type=feature_type,
        chunk_size=4,
    ).double()
    q, k, v = random_qkv(1, 2, 19, 8, seed=5)
    out = attn(q, k, v)
    for t in (0, 3, 4, 10, 18):
        grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True)
        for grad in grads:
            assert torch.count_nonzero(grad[:, :, t + 1 :]) == 0
        assert torch.count_nonzero(grads[2][:, :, : t + 1]) > 0  # the past does flow back


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_causal_output_does_not_depend_on_future_values(kernel):
    """Not just zero gradients: changing keys/values after t leaves outputs up to t bit-identical."""
    attn = FastAttention(head_dim=16, num_features=32, kernel=kernel, causal=True, chunk_size=8)
    q, k, v = (x.detach().float() for x in random_qkv(1, 2, 40, 16, seed=9))
    out = attn(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 21:] *= 5.0  # much larger key logits later on
    v2[:, :, 21:] = -v2[:, :, 21:]
    out2 = attn(q, k2, v2)
    assert torch.equal(out[:, :, :21], out2[:, :, :21])
    assert not torch.allclose(out[:, :, 21:], out2[:, :, 21:])


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_recomputed_features_give_the_same_gradients(monkeypatch, kernel):
    """Beyond the memory budget, rows go in blocks and the backward recomputes their features;
    a row beyond the block budget goes in segments of whole chunks, the state and the running
    max of the key scales carried across them (keys grow along the sequence, so it rises)."""
    attn = FastAttention(
        head_dim=8, num_features=16, kernel=kernel, causal=True, chunk_size=4
    ).double()
    q, k, v = random_qkv(2, 3, 23, 8, seed=12)
    k = k * torch.linspace(0.2, 3.0, 23, dtype=torch.float64).view(1, 1, 23, 1)
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[0, 17:] = True
    two_chunks = 4 * 16 * 4 * 2  # one row, two chunks of 4 positions, 16 features
    results = []
    # One block with kept features; segments of two chunks, kept; one row and chunk at a time.
    for block_budget, keep_budget in ((1 << 30, 1 << 30), (two_chunks, 1 << 30), (0, 0)):
        monkeypatch.setitem(blocks.KEEP_FEATURES_BYTES, "cpu", keep_budget)
        monkeypatch.setitem(blocks.BLOCK_BYTES, "cpu", block_budget)
        out = attn(q, k, v, key_padding_mask=mask)
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v))))
    for one_piece, *pieces in zip(*results, strict=True):
        for other in pieces:
            assert torch.allclose(one_piece, other, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
def test_recurrence_equals_chunked_kernel(kernel, feature_type):
    """causal_step, one position at a time from its DecodeState, gives CausalFavor's output at
    every position. Keys grow along the sequence, so the running max of the key scales rises
    and the recurrence rescales its state as the chunked kernel rescales its carried state."""
    attn = FastAttention(
        head_dim=8, num_features=16, kernel=kernel, causal=True, feature_type=feature_type,
        chunk_size=8,
    ).double()  # fmt: skip
    q, k, v = (x.detach() for x in random_qkv(2, 3, 40, 8, seed=14))
    k = k * torch.linspace(0.2, 3.0, 40, dtype=torch.float64).view(1, 1, 40, 1)
    w, feature_map = attn.feature_weights(torch.float64), attn.feature_map
    rows = [x.reshape(6, 40, 8) for x in (q, k, v)]
    chunked = CausalFavor.apply(*rows, w, None, feature_map, 8).view(2, 3, 40, 8)
    state, steps = None, []
    for t in range(40):
        position = slice(t, t + 1)
        out, state = causal_step(
            q[:, :, position], k[:, :, position], v[:, :, position], w, feature_map, state
        )
        steps.append(out)
    assert torch.allclose(torch.cat(steps, dim=2), chunked, atol=1e-12, rtol=0)
    num_features = 8 if feature_type == "deterministic" else 16
    assert state.context.shape == (2, 3, num_features, 9)
    assert state.value_sum.shape == (2, 3, 1, 9)
    assert (state.key_max is None) == (kernel == "relu")
