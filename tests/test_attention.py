"""FastAttention, the nn.Module: FAVOR+ or exact attention behind one interface (padding,
strided inputs, feature redraws, decoding steps, dtypes, arguments). The FAVOR+ ops themselves
are tested in tests/favor/."""

from __future__ import annotations

import pytest
import torch

from protperf.attention import KERNEL_NAMES, KERNELS, FastAttention, check_kernel
from protperf.favor.reference import random_qkv

KERNEL_SETUPS = [
    pytest.param("softmax", "orthogonal", id="softmax"),
    pytest.param("relu", "deterministic", id="relu"),
    pytest.param("relu", "orthogonal", id="relu-projected"),
]


@pytest.mark.parametrize("kernel", ["softmax", "relu", "exact"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_invariance_float32(kernel, causal):
    attn = FastAttention(head_dim=16, num_features=64, kernel=kernel, causal=causal, chunk_size=16)
    q, k, v = (x.detach().float() for x in random_qkv(3, 2, 100, 16, seed=7, scale=1.0))
    lengths = [100, 41, 73]
    mask = torch.arange(100)[None, :] >= torch.tensor(lengths)[:, None]
    batched = attn(q, k, v, key_padding_mask=mask)
    for row, length in enumerate(lengths):
        alone = attn(
            q[row : row + 1, :, :length], k[row : row + 1, :, :length], v[row : row + 1, :, :length]
        )
        assert torch.allclose(batched[row : row + 1, :, :length], alone, atol=1e-5, rtol=0)
        assert torch.count_nonzero(batched[row, :, length:]) == 0


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_strided_inputs_give_what_contiguous_ones_give(kernel, feature_type, causal):
    """q, k, v as a model makes them (views of one (B, L, 3, H, d) projection, heads interleaved)
    give the outputs and gradients of contiguous copies: the kernels see the same rows."""
    attn = FastAttention(
        head_dim=16, num_features=32, kernel=kernel, causal=causal, feature_type=feature_type,
        chunk_size=8,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    projected = torch.randn(1, 40, 3, 2, 16, generator=generator, dtype=torch.float64)
    strided = projected.clone().requires_grad_()
    q, k, v = strided.permute(2, 0, 3, 1, 4)  # (B, H, L, d) each, not contiguous
    assert not q.is_contiguous()
    dense = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    out_strided, out_dense = attn(q, k, v), attn(*dense)
    weights = torch.randn(out_dense.shape, generator=generator, dtype=torch.float64)
    (out_strided * weights).sum().backward()
    (out_dense * weights).sum().backward()
    assert torch.allclose(out_strided, out_dense, rtol=0, atol=1e-12)
    grads = strided.grad.permute(2, 0, 3, 1, 4)
    for grad, x in zip(grads, dense, strict=True):
        assert torch.allclose(grad, x.grad, rtol=0, atol=1e-12)


def test_redraw_is_deterministic_across_modules():
    a = FastAttention(head_dim=32, num_features=64)
    b = FastAttention(head_dim=32, num_features=64, seed=99)
    assert not torch.equal(a.projection, b.projection)
    a.redraw(1234)
    b.redraw(1234)
    assert torch.equal(a.projection, b.projection)
    before = a.projection.clone()
    a.redraw(1235)
    assert not torch.equal(before, a.projection)
    assert "projection" in a.state_dict()


def test_softmax_favor_approximates_exact_attention():
    q, k, v = (x.detach() for x in random_qkv(1, 2, 64, 16, seed=2, scale=0.5))
    exact = FastAttention(head_dim=16, kernel="exact").double()(q, k, v)
    errors = []
    for m in (32, 2048):
        favor = FastAttention(head_dim=16, num_features=m, kernel="softmax").double()
        errors.append((favor(q, k, v) - exact).abs().mean().item())
    assert errors[1] < 0.02
    assert errors[1] < errors[0] / 3


@pytest.mark.parametrize("kernel", ["softmax", "relu", "exact"])
def test_exact_and_favor_match_sdpa_causality_convention(kernel):
    """Position 0 of a causal layer sees only itself: its output is v_0 for every kernel."""
    q, k, v = (x.detach().float() for x in random_qkv(2, 2, 10, 8, seed=4))
    out = FastAttention(head_dim=8, num_features=16, kernel=kernel, causal=True)(q, k, v)
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-5)


@pytest.mark.parametrize("kernel", ["softmax", "relu", "exact"])
def test_decoding_steps_match_causal_forward(kernel):
    attn = FastAttention(head_dim=16, num_features=64, kernel=kernel, causal=True, chunk_size=8)
    q, k, v = (x.detach().float() for x in random_qkv(2, 2, 40, 16, seed=6, scale=0.5))
    full = attn(q, k, v)
    state, steps = None, []
    for t in range(40):
        out, state = attn.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        steps.append(out)
    assert torch.allclose(torch.cat(steps, dim=2), full, atol=1e-5, rtol=0)
    if kernel != "exact":
        assert state.context.shape == (2, 2, attn.num_features if kernel == "softmax" else 16, 17)


@pytest.mark.parametrize("direction", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_long_sequences_stay_finite(direction, autocast):
    """L = 32,768 with large activations: outputs and gradients finite in float32 and bf16 autocast."""
    torch.manual_seed(0)
    length, dim = 32_768, 16
    project = torch.nn.Linear(dim, 3 * dim)
    attn = FastAttention(head_dim=dim, num_features=32, causal=direction, chunk_size=128)
    x = torch.randn(1, length, dim) * 3.0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        q, k, v = project(x).view(1, length, 3, 1, dim).permute(2, 0, 3, 1, 4)
        out = attn(q * 4.0, k * 4.0, v)
        loss = out.float().pow(2).mean()
    loss.backward()
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.isfinite(out.float()).all()
    assert torch.isfinite(project.weight.grad).all() and project.weight.grad.abs().sum() > 0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kernel"):
        FastAttention(head_dim=8, kernel="cosine")
    with pytest.raises(ValueError, match="random features"):
        FastAttention(head_dim=8, kernel="softmax", feature_type="deterministic")
    with pytest.raises(RuntimeError, match="bidirectional"):
        FastAttention(head_dim=8, causal=False).step(*(torch.zeros(1, 1, 1, 8) for _ in range(3)))


def test_kernel_names_and_check():
    """One list of kernels for the whole project: each has its row name in the paper's table."""
    assert KERNELS == ("softmax", "relu", "exact")
    assert set(KERNEL_NAMES) == set(KERNELS)
    for kernel in KERNELS:
        assert check_kernel(kernel) == kernel
    with pytest.raises(ValueError, match="kernel must be 'softmax', 'relu' or 'exact'"):
        check_kernel("cosine")


def test_builds_on_the_meta_device():
    """Large models can be sized without allocating: the feature draw stays on the CPU."""
    with torch.device("meta"):
        attn = FastAttention(head_dim=64, num_features=256)
    assert attn.projection.device.type == "meta" and attn.projection.shape == (256, 64)
