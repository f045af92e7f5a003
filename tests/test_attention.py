"""FastAttention, the nn.Module: FAVOR+ or exact attention behind one interface (padding,
strided inputs, feature redraws, decoding steps, dtypes, arguments, the choice of kernels'
backend). The FAVOR+ ops themselves are tested in tests/favor/."""

from __future__ import annotations

import os

# The Triton backend on CPU tensors runs under Triton's interpreter, which Triton reads when
# protperf's kernel modules are first imported (on the first Triton call, after this).
os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys

import pytest
import torch

from protperf.attention import (
    BACKENDS,
    KERNEL_NAMES,
    KERNELS,
    FastAttention,
    check_backend,
    check_kernel,
)
from protperf.favor import triton as favor_triton
from protperf.favor.reference import random_qkv
from protperf.model import PerformerConfig, PerformerLM

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
    assert KERNELS == ("softmax", "relu", "exact", "reformer", "linformer")
    assert set(KERNEL_NAMES) == set(KERNELS)
    for kernel in KERNELS:
        assert check_kernel(kernel) == kernel
    with pytest.raises(ValueError, match="kernel must be one of 'softmax', 'relu', 'exact', 're"):
        check_kernel("cosine")


def test_builds_on_the_meta_device():
    """Large models can be sized without allocating: the feature draw stays on the CPU."""
    with torch.device("meta"):
        attn = FastAttention(head_dim=64, num_features=256)
    assert attn.projection.device.type == "meta" and attn.projection.shape == (256, 64)


def test_backends_are_checked():
    assert BACKENDS == ("auto", "torch", "triton")
    for backend in BACKENDS:
        assert check_backend(backend) == backend
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton'"):
        FastAttention(head_dim=8, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        PerformerConfig(dim=32, heads=2, attention_backend="cuda")


def test_auto_runs_the_pytorch_kernels_on_the_cpu():
    """``auto`` picks Triton for CUDA tensors only: on the CPU it is the PyTorch path, bit for bit."""
    q, k, v = (x.detach().float() for x in random_qkv(1, 2, 30, 8, seed=1))
    auto = FastAttention(head_dim=8, num_features=16, causal=True, chunk_size=8)
    torch_backend = FastAttention(
        head_dim=8, num_features=16, causal=True, chunk_size=8, backend="torch"
    )
    assert auto.backend == "auto" and not auto.uses_triton(q)
    assert torch.equal(auto(q, k, v), torch_backend(q, k, v))
    assert "backend='auto'" in repr(auto)


def test_triton_backend_says_where_it_cannot_run(monkeypatch):
    attn = FastAttention(head_dim=8, num_features=16, backend="triton")
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="float32"):
        attn.uses_triton(q.double())
    monkeypatch.setattr(favor_triton, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        attn.uses_triton(q)
    monkeypatch.setattr(favor_triton, "available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        attn.uses_triton(q)
    assert not FastAttention(head_dim=8, backend="auto").uses_triton(q)
    assert not FastAttention(head_dim=8, kernel="exact", backend="triton").uses_triton(q)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_backend_through_the_module(causal):
    """backend="triton" (here on CPU tensors, under the interpreter) gives the PyTorch backend's
    outputs and gradients, zero at padding, in the inputs' dtype."""
    results = []
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[1, 15:] = True
    for backend in ("torch", "triton"):
        attn = FastAttention(head_dim=16, num_features=32, causal=causal, backend=backend)
        q, k, v = (x.detach().float().requires_grad_() for x in random_qkv(2, 2, 23, 16, seed=2))
        out = attn(q, k, v, key_padding_mask=mask)
        out.pow(2).sum().backward()
        results.append([out, q.grad, k.grad, v.grad])
    for a, b in zip(*results, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.detach().abs().max()))
    assert torch.count_nonzero(results[1][0][1, :, 15:]) == 0


def test_model_passes_its_backend_to_attention_and_loads_without_it():
    """PerformerConfig.attention_backend reaches every layer; a config.json written before the
    option existed (no such key) loads with the default, so old exports still load."""
    config = PerformerConfig(
        dim=32, depth=2, heads=2, ff_dim=64, num_features=16, dropout=0.0, causal=True,
        attention_backend="triton",
    )  # fmt: skip
    model = PerformerLM(config)
    assert {block.attn.attention.backend for block in model.blocks} == {"triton"}
    old = config.to_dict()
    del old["attention_backend"]
    assert PerformerConfig.from_dict(old).attention_backend == "auto"
    tokens = torch.randint(5, 30, (1, 20), generator=torch.Generator().manual_seed(0))
    reference = PerformerLM(PerformerConfig.from_dict({**old, "attention_backend": "torch"}))
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        model(tokens)["logits"], reference(tokens)["logits"], rtol=0, atol=1e-4
    )


def test_protperf_runs_without_triton():
    """Triton is imported only where its kernels run: without it, protperf imports, ``auto``
    runs the PyTorch kernels, and asking for ``triton`` says what is missing."""
    script = """
import sys
sys.modules["triton"] = None  # as if not installed: importing it raises ImportError
import torch
from protperf.attention import FastAttention
from protperf.favor import triton as favor_triton
assert not favor_triton.available()
q = torch.randn(1, 2, 10, 8)
print(FastAttention(head_dim=8, num_features=16, causal=True)(q, q, q).shape)
try:
    FastAttention(head_dim=8, backend="triton")(q, q, q)
except RuntimeError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 2, 10, 8])" in done.stdout and "pip install triton" in done.stdout
