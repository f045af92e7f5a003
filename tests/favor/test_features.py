"""FAVOR+ feature maps and random projections: unbiasedness, orthogonality, the exp floor."""

from __future__ import annotations

import math

import pytest
import torch

from protperf.attention import FastAttention
from protperf.favor import (
    DEFAULT_EXP_FLOOR,
    EXP_FLOOR,
    flush_exp_,
    gaussian_iid_projection,
    gaussian_orthogonal_projection,
)
from protperf.favor.reference import random_qkv, softmax_kernel_features


@pytest.mark.parametrize("feature_type", ["orthogonal", "iid"])
def test_softmax_features_are_unbiased(feature_type):
    dim, draws = 16, 3000
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(6, dim, generator=generator, dtype=torch.float64) * 0.5
    k = torch.randn(6, dim, generator=generator, dtype=torch.float64) * 0.5
    exact = torch.exp(q @ k.T / math.sqrt(dim))
    draw = (
        gaussian_orthogonal_projection if feature_type == "orthogonal" else gaussian_iid_projection
    )
    estimates = []
    for seed in range(draws):
        projection = draw(32, dim, generator=torch.Generator().manual_seed(seed)).double()
        estimates.append(
            softmax_kernel_features(q, projection) @ softmax_kernel_features(k, projection).T
        )
    estimates = torch.stack(estimates)
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / math.sqrt(draws)
    z = (mean - exact) / standard_error
    assert z.abs().max() < 4.5  # 36 pairs; a biased estimator fails this by far
    assert ((mean - exact).abs() / exact).max() < 0.03
    # A single draw is far from exact: the test is about the average, not luck.
    assert ((estimates[0] - exact).abs() / exact).max() > 0.05


def test_orthogonal_features_beat_iid_and_improve_with_m():
    # The estimator is heavy-tailed for large |q|, |k|; at this scale 400 draws give a stable
    # mean (two halves of the draws agree within a few %), and orthogonal features measure
    # about 0.8x the i.i.d. MSE at every m.
    dim, seeds = 16, 400
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(32, dim, generator=generator, dtype=torch.float64) * 0.3
    k = torch.randn(32, dim, generator=generator, dtype=torch.float64) * 0.3
    exact = torch.exp(q @ k.T / math.sqrt(dim))

    def mse(draw, m):
        errors = []
        for seed in range(seeds):
            projection = draw(
                m, dim, generator=torch.Generator().manual_seed(10_000 + seed)
            ).double()
            estimate = (
                softmax_kernel_features(q, projection) @ softmax_kernel_features(k, projection).T
            )
            errors.append(((estimate - exact) ** 2).mean())
        return torch.stack(errors).mean().item()

    results = {
        (name, m): mse(draw, m)
        for name, draw in (
            ("orthogonal", gaussian_orthogonal_projection),
            ("iid", gaussian_iid_projection),
        )
        for m in (16, 64, 256)
    }
    for name in ("orthogonal", "iid"):
        # MSE falls as 1/m: 4x the features, about 4x lower error.
        assert results[(name, 16)] > 3 * results[(name, 64)] > 9 * results[(name, 256)]
    for m in (16, 64, 256):
        assert results[("orthogonal", m)] < 0.9 * results[("iid", m)]


def test_orthogonal_projection_structure():
    projection = gaussian_orthogonal_projection(
        40, 16, generator=torch.Generator().manual_seed(0)
    ).double()
    assert projection.shape == (40, 16)
    for start in (0, 16):
        block = projection[start : start + 16]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-4  # rows within a block are orthogonal
    norms = projection.norm(dim=1)
    assert norms.std() > 0.1  # chi(d) lengths, not all equal
    fixed = gaussian_orthogonal_projection(
        16, 16, generator=torch.Generator().manual_seed(0), scaling="sqrt_d"
    )
    assert torch.allclose(fixed.norm(dim=1), torch.full((16,), 4.0), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_softmax_kernel_feeds_no_subnormals_to_matmuls(monkeypatch, causal):
    """A trained model's large q, k make exp() underflow; subnormal floats slow CPU matmuls 4-10x.

    The kernel flushes them to zero (protperf.favor.flush_exp_): no matmul operand in the forward
    or backward holds a subnormal, and the float32 result still equals float64's.
    """
    # IEEE subnormals in this thread, whatever an earlier in-process `protperf` call turned on
    # (flush-to-zero would hide them from the kernel and from the count alike).
    torch.set_flush_denormal(False)
    tiny = torch.finfo(torch.float32).tiny
    subnormal_counts = []

    def counting(op):
        def wrapped(*args, **kwargs):
            for tensor in args:
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                    subnormal_counts.append(
                        int(((tensor != 0) & (tensor.abs() < tiny)).sum().item())
                    )
            return op(*args, **kwargs)

        return wrapped

    for name in ("bmm", "matmul"):
        monkeypatch.setattr(torch, name, counting(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "baddbmm_", counting(torch.Tensor.baddbmm_))
    attn = FastAttention(head_dim=32, num_features=64, kernel="softmax", causal=causal)
    q, k, v = random_qkv(2, 2, 300, 32, dtype=torch.float32, seed=5, scale=10.0)
    out = attn(q, k, v)
    out.pow(2).sum().backward()
    monkeypatch.undo()
    assert len(subnormal_counts) > 10 and sum(subnormal_counts) == 0
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64 = attn.double()(q64, k64, v64)
    out64.pow(2).sum().backward()
    assert torch.allclose(out.double(), out64, rtol=1e-4, atol=1e-4)
    for grad, grad64 in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.allclose(grad.double(), grad64, rtol=1e-3, atol=1e-3 * grad64.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_flush_exp_is_exp_with_a_floor(dtype):
    """exp where the exponent is above the dtype's floor, exactly 0 at or below it (never a
    subnormal), -inf -> 0, NaN stays NaN."""
    torch.set_flush_denormal(False)
    floor = EXP_FLOOR.get(dtype, DEFAULT_EXP_FLOOR)
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(4096, generator=generator, dtype=torch.float64) * 1.5 * floor).to(dtype)
    x[:3] = torch.tensor([-math.inf, math.nan, 0.0], dtype=dtype)
    got = flush_exp_(x.clone())
    expected = x.exp().masked_fill(x <= floor, 0.0)
    assert torch.isnan(got[1]) and got[0] == 0 and got[2] == 1
    keep = ~torch.isnan(x)
    assert torch.equal(got[keep], expected[keep])
    assert (got[keep] == 0).sum() > 1000 and (got[keep] > 0).sum() > 1000
    assert not ((got != 0) & (got.abs() < torch.finfo(dtype).tiny)).any()
