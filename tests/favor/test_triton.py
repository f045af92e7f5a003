"""Triton's FAVOR+ kernels (protperf.favor.triton) against the PyTorch kernels of protperf.favor,
under Triton's CPU interpreter (see conftest.py): outputs and the gradients of q, k, v in
float32 for both feature maps and both directions, at lengths that leave a partial chunk, with
padding at both ends of a row, feature tiles of which the last is partly padding and a head
size that is not a power of two; the causal kernel's past bit for bit unchanged by the future;
and the causal kernel equal to the decoding recurrence position by position.

Sizes are small (the interpreter runs each program in Python) and the feature tiles are 16
wide here, so that several tiles and several chunks of 16 positions are exercised."""

from __future__ import annotations

import pytest
import torch

from protperf.attention import FastAttention
from protperf.favor import causal_step
from protperf.favor import triton as favor_triton

#: (kernel, feature_type, head_dim, num_features)
CASES = [
    pytest.param("softmax", "orthogonal", 16, 40, id="softmax"),
    pytest.param("relu", "deterministic", 16, 16, id="relu"),
    pytest.param("relu", "orthogonal", 12, 40, id="relu-projected"),
]
CHUNK = 16


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Feature tiles of 16: several tiles (the last partly padding) at m = 40."""
    from protperf.favor.triton import features

    monkeypatch.setattr(features, "FEATURE_TILE", 16)
    monkeypatch.setattr(features, "SMALL_FEATURE_TILE", 16)


def _inputs(dim, length=37, batch=2, heads=2, seed=3, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, heads, length, dim, generator=generator) * scale).requires_grad_()
        for _ in range(3)
    ]


def _padding(batch, length):
    """Row 1 padded at both ends (so that causal queries at its start see no valid key)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, :5] = True
    mask[1, length - 8 :] = True
    return mask


def _triton(attn, q, k, v, mask=None, **options):
    run = favor_triton.causal_favor if attn.causal else favor_triton.bidirectional_favor
    return run(
        q, k, v, attn.feature_weights(), mask, softmax=attn.kernel == "softmax",
        eps=attn.feature_map.eps, chunk=CHUNK, **options,
    )  # fmt: skip


def _reference(attn, q, k, v, mask, weights):
    """The PyTorch kernels in float64: the output and the gradients of (out * weights).sum()."""
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = attn.double()(*inputs, key_padding_mask=mask)
    attn.float()
    return [out, *torch.autograd.grad((out * weights.double()).sum(), inputs)]


def _assert_close(actual, expected, tolerance=2e-5):
    """Float32 against float64, relative to the largest entry (or to 1 when that is smaller,
    as for dq at a single position, which is zero up to rounding)."""
    scale = max(float(expected.detach().abs().max()), 1.0)
    torch.testing.assert_close(actual.detach().double(), expected.detach(), rtol=0,
                               atol=tolerance * scale)  # fmt: skip


def _module(kernel, feature_type, dim, num_features, causal):
    return FastAttention(
        head_dim=dim, num_features=num_features, kernel=kernel, feature_type=feature_type,
        causal=causal, backend="torch",
    )  # fmt: skip


@pytest.mark.parametrize("kernel,feature_type,dim,num_features", CASES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_equals_the_pytorch_kernels(kernel, feature_type, dim, num_features, causal):
    attn = _module(kernel, feature_type, dim, num_features, causal)
    q, k, v = _inputs(dim)
    mask = _padding(2, 37)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    expected = _reference(attn, q, k, v, mask, weights)
    out = _triton(attn, q, k, v, mask)
    actual = [out, *torch.autograd.grad((out * weights).sum(), (q, k, v))]
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape, name
        _assert_close(a, e)
    padded = mask[:, None, :, None].expand_as(out)
    for tensor in actual:  # exactly zero at padding: outputs, and gradients of padded q, k, v
        assert torch.count_nonzero(tensor[padded]) == 0


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_bidirectional_context_in_splits(splits):
    """The context summed by one program per row, or by several and then added in order."""
    attn = _module("softmax", "orthogonal", 16, 40, causal=False)
    q, k, v = _inputs(16, length=45, batch=1)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    expected = _reference(attn, q, k, v, None, weights)
    out = _triton(attn, q, k, v, splits=splits)
    actual = [out, *torch.autograd.grad((out * weights).sum(), (q, k, v))]
    for a, e in zip(actual, expected, strict=True):
        _assert_close(a, e)


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sequences_shorter_than_a_chunk(length, causal):
    attn = _module("softmax", "orthogonal", 16, 40, causal)
    q, k, v = _inputs(16, length=length, batch=1)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    expected = _reference(attn, q, k, v, None, weights)
    out = _triton(attn, q, k, v)
    actual = [out, *torch.autograd.grad((out * weights).sum(), (q, k, v))]
    for a, e in zip(actual, expected, strict=True):
        _assert_close(a, e)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_causal_past_is_bit_identical_whatever_the_future(kernel):
    """Keys and values after position t changed (much larger keys: a higher running max of the
    key scales): outputs up to t bit for bit the same, and no gradient reaches past t."""
    attn = _module(kernel, None, 16, 40, causal=True)
    q, k, v = _inputs(16, length=45, batch=1)
    t = 21  # inside the second chunk of 16
    out = _triton(attn, q, k, v)
    later_k, later_v = k.detach().clone(), v.detach().clone()
    later_k[:, :, t:] *= 5.0
    later_v[:, :, t:] = -later_v[:, :, t:]
    changed = _triton(attn, q.detach(), later_k, later_v)
    assert torch.equal(out[:, :, :t], changed[:, :, :t])
    assert not torch.allclose(out[:, :, t:], changed[:, :, t:])
    grads = torch.autograd.grad(out[:, :, :t].sum(), (q, k, v))
    for grad in grads:
        assert torch.count_nonzero(grad[:, :, t:]) == 0
    assert torch.count_nonzero(grads[2][:, :, :t]) > 0


@pytest.mark.parametrize("kernel,feature_type,dim,num_features", CASES)
def test_causal_equals_the_decoding_recurrence(kernel, feature_type, dim, num_features):
    """Position by position, what causal_step computes from its DecodeState (the state at the
    running max of the key scales; keys grow along the sequence so that the max rises)."""
    attn = _module(kernel, feature_type, dim, num_features, causal=True)
    q, k, v = (x.detach() for x in _inputs(dim, length=40, batch=1, seed=14))
    k = k * torch.linspace(0.2, 3.0, 40).view(1, 1, 40, 1)
    chunked = _triton(attn, q, k, v)
    state, steps = None, []
    w = attn.feature_weights()
    for t in range(40):
        position = slice(t, t + 1)
        out, state = causal_step(
            q[:, :, position], k[:, :, position], v[:, :, position], w, attn.feature_map, state
        )
        steps.append(out)
    _assert_close(chunked, torch.cat(steps, dim=2).double(), tolerance=1e-5)


def test_strided_bfloat16_inputs_give_bfloat16_in_the_model_layout():
    """q, k, v as a model makes them under bf16 autocast (views of one (B, L, 3, H, d)
    projection): read in place, computed in float32, returned in bfloat16 and laid out as
    (B, L, H, d), so that merging the heads back is a view."""
    attn = _module("softmax", "orthogonal", 16, 40, causal=True)
    projected = torch.randn(2, 37, 3, 2, 16, generator=torch.Generator().manual_seed(7))
    leaf = projected.bfloat16().requires_grad_()
    q, k, v = leaf.permute(2, 0, 3, 1, 4)
    out = _triton(attn, q, k, v)
    assert out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()
    expected = attn(*(x.detach().float() for x in (q, k, v)))
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)
    out.float().square().sum().backward()
    assert leaf.grad.dtype == torch.bfloat16 and bool(torch.isfinite(leaf.grad).all())
    assert torch.count_nonzero(leaf.grad) > 0
