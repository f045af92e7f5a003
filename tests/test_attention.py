"""FAVOR+ attention: exactness against quadratic references, causality, padding, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from protperf.attention import (
    FastAttention,
    gaussian_iid_projection,
    gaussian_orthogonal_projection,
    relu_kernel_features,
    softmax_kernel_features,
)

KERNEL_SETUPS = [
    pytest.param("softmax", "orthogonal", id="softmax"),
    pytest.param("relu", "deterministic", id="relu"),
    pytest.param("relu", "orthogonal", id="relu-projected"),
]


def naive_reference(attn: FastAttention, q, k, v, key_padding_mask=None):
    """Quadratic FAVOR+: features by the plain feature maps, A = Q'K'^T (masked), row-normalised.

    Causal softmax: query i sees key j through exp(W k'_j - |k'_j|^2/2 - M_i) + eps, M_i the max
    over keys up to i (so that nothing after i enters position i, not even a stabiliser).
    """
    projection = attn.projection.to(q.dtype) if attn.projection.shape[0] else None
    if attn.kernel == "softmax" and attn.causal:
        return naive_causal_softmax(q, k, v, projection, attn.feature_map.eps, key_padding_mask)
    if attn.kernel == "softmax":
        qf = softmax_kernel_features(q, projection, is_query=True)
        kf = softmax_kernel_features(
            k, projection, is_query=False, key_padding_mask=key_padding_mask
        )
    else:
        qf = relu_kernel_features(q, projection)
        kf = relu_kernel_features(k, projection, key_padding_mask=key_padding_mask)
    scores = qf @ kf.transpose(-2, -1)
    if attn.causal:
        scores = scores.tril()
    return normalise_rows(scores, v, key_padding_mask)


def naive_causal_softmax(q, k, v, projection, eps, key_padding_mask):
    dim, length = q.shape[-1], q.shape[-2]
    q_logits = (q * dim**-0.25) @ projection.T
    query_features = torch.exp(q_logits - q_logits.amax(-1, keepdim=True).detach()) + eps
    k_scaled = k * dim**-0.25
    k_logits = k_scaled @ projection.T - k_scaled.pow(2).sum(-1, keepdim=True) / 2  # (B, H, L, m)
    valid = torch.ones(q.shape[0], length, dtype=torch.bool)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid = valid[:, None, :, None]
    key_max = k_logits.detach().amax(-1, keepdim=True).masked_fill(~valid, -torch.inf)
    running_max = torch.cummax(key_max.squeeze(-1), dim=-1).values  # (B, H, L)
    # (B, H, L_i, L_j, m): key j's features as query i sees them.
    key_features = torch.exp(k_logits.unsqueeze(2) - running_max[..., :, None, None]) + eps
    key_features = key_features * valid.unsqueeze(2)
    scores = torch.einsum("bhim,bhijm->bhij", query_features, key_features).tril()
    return normalise_rows(scores, v, key_padding_mask)


def normalise_rows(scores, v, key_padding_mask):
    out = (scores @ v) / scores.sum(-1, keepdim=True)
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return out


def random_qkv(batch, heads, length, dim, dtype=torch.float64, seed=0, scale=0.7):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) * scale
        ).requires_grad_()
        for _ in range(3)
    ]


@pytest.mark.parametrize("kernel,feature_type", KERNEL_SETUPS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("scan_group", [32, 2], ids=["one-scan-group", "scan-groups"])
def test_fused_kernels_equal_quadratic_reference_float64(
    monkeypatch, kernel, feature_type, causal, padded, scan_group
):
    # With groups of 2 chunks, the 5 chunks' state scan spans 3 groups, the last one padded.
    monkeypatch.setattr("protperf.favor.SCAN_GROUP", scan_group)
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
def test_bidirectional_position_segments_equal_one_piece(monkeypatch, kernel):
    """A row too large for the block budget is summed in position segments, its stabiliser M
    raised segment by segment (keys grow along the sequence here, so it is): the output and
    gradients equal the one-piece computation, with kept and with recomputed features."""
    import protperf.favor as favor

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
        monkeypatch.setitem(favor.BLOCK_BYTES, "cpu", block_budget)
        monkeypatch.setitem(favor.KEEP_FEATURES_BYTES, "cpu", keep_budget)
        assert len(favor._segments(23, 1, 16, q.device)) == (1 if block_budget > 1e6 else 5)
        out = attn(q, k, v, key_padding_mask=mask)
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v))))
    for one_piece, *segmented in zip(*results, strict=True):
        for other in segmented:
            assert torch.allclose(one_piece, other, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_recomputed_features_give_the_same_gradients(monkeypatch, kernel):
    """Beyond the memory budget, rows go in blocks and the backward recomputes their features;
    a row beyond the block budget goes in segments of whole chunks, the state and the running
    max of the key scales carried across them (keys grow along the sequence, so it rises)."""
    import protperf.favor as favor

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
        monkeypatch.setitem(favor.KEEP_FEATURES_BYTES, "cpu", keep_budget)
        monkeypatch.setitem(favor.BLOCK_BYTES, "cpu", block_budget)
        out = attn(q, k, v, key_padding_mask=mask)
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v))))
    for one_piece, *pieces in zip(*results, strict=True):
        for other in pieces:
            assert torch.allclose(one_piece, other, atol=1e-12, rtol=0)


def test_builds_on_the_meta_device():
    """Large models can be sized without allocating: the feature draw stays on the CPU."""
    with torch.device("meta"):
        attn = FastAttention(head_dim=64, num_features=256)
    assert attn.projection.device.type == "meta" and attn.projection.shape == (256, 64)


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
    from protperf.favor import DEFAULT_EXP_FLOOR, EXP_FLOOR, flush_exp_

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
