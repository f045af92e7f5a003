"""The fused FAVOR+ kernels against their references: the naive quadratic forms of
protperf.favor.reference (outputs and gradients, in float64) and finite differences."""

from __future__ import annotations

import pytest
import torch
from favor_cases import KERNEL_SETUPS

from protperf.attention import FastAttention
from protperf.favor.reference import naive_favor_attention, random_qkv


def naive_reference(attn: FastAttention, q, k, v, key_padding_mask=None):
    """The quadratic FAVOR+ of protperf.favor.reference with ``attn``'s features."""
    projection = attn.projection.to(q.dtype) if attn.projection.shape[0] else None
    return naive_favor_attention(
        q, k, v, projection, kernel=attn.kernel, causal=attn.causal, eps=attn.feature_map.eps,
        key_padding_mask=key_padding_mask,
    )  # fmt: skip


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("scan_group", [32, 2], ids=["one-scan-group", "scan-groups"])
def test_fused_kernels_equal_quadratic_reference_float64(
    monkeypatch, kernel, feature_type, causal, padded, scan_group
):
    # With groups of 2 chunks, the 5 chunks' state scan spans 3 groups, the last one padded.
    monkeypatch.setattr("protperf.favor.causal.SCAN_GROUP", scan_group)
    # 37 positions in chunks of 8: the last chunk is partial.
    attn = FastAttention(
        head_dim=8,
        num_features=24,
        kernel=kernel,
        causal=causal,
        feature_type=feature_type,
        chunk_size=8,
        seed=3,
    ).double()
    q, k, v = random_qkv(2, 3, 37, 8)
    mask = None
    if padded:
        mask = torch.zeros(2, 37, dtype=torch.bool)
        mask[1, 29:] = True
    out = attn(q, k, v, key_padding_mask=mask)
    ref = naive_reference(attn, q, k, v, key_padding_mask=mask)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert torch.allclose(grad, ref_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gradcheck(kernel, feature_type, causal):
    # Without the stabiliser the output is exactly invariant to the (constant) max-subtraction,
    # so finite differences see the same function the hand-written backward differentiates.
    attn = FastAttention(
        head_dim=4, num_features=8, kernel=kernel, causal=causal, feature_type=feature_type, chunk_size=4,
        stabilizer=0.0 if kernel == "softmax" else None,
    ).double()  # fmt: skip
    q, k, v = random_qkv(1, 2, 7, 4, seed=11)
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[:, 6:] = True

    def fn(q, k, v):
        return attn(q, k, v, key_padding_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
def test_causal_reference_is_the_bidirectional_one_on_the_past(kernel, feature_type):
    """The two references agree: position t of the causal one is the last position of the
    bidirectional one over positions 0..t (its M the max over those keys, as M_t)."""
    attn = FastAttention(head_dim=8, num_features=24, kernel=kernel, feature_type=feature_type)
    projection = attn.projection.double() if attn.projection.shape[0] else None
    q, k, v = (x.detach() for x in random_qkv(2, 3, 12, 8, seed=15))
    k = k * torch.linspace(0.2, 3.0, 12, dtype=torch.float64).view(1, 1, 12, 1)
    options = {"kernel": kernel, "eps": attn.feature_map.eps}
    causal = naive_favor_attention(q, k, v, projection, causal=True, **options)
    for t in range(12):
        past = (x[:, :, : t + 1] for x in (q, k, v))
        bidirectional = naive_favor_attention(*past, projection, causal=False, **options)
        assert torch.allclose(causal[:, :, t], bidirectional[:, :, t], atol=1e-12, rtol=0)
