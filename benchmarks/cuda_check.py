"""Correctness of protperf's accelerator paths: run it on a GPU, compare with the CPU.

The test suite runs on CPUs only (CI has no GPU), so the CUDA paths are checked here, in one
process, against the same computation on the CPU:

* FAVOR+ (softmax and generalized kernels, causal and bidirectional, with padding): outputs and
  the gradients of q, k, v on the device equal the CPU's in float32 (TF32 off);
* bf16 autocast at L = 32,768: finite outputs and gradients (FAVOR+ stays float32 inside);
* a PerformerLM training step in bf16-mixed on the device: finite loss, finite gradients,
  weights that move;
* generation: the decoding recurrence on the device picks, token by token, what greedy decoding
  through the full forward pass picks;
* embedding: a protein's embedding does not depend on the padding of its batch.

On CUDA, FastAttention's default backend ("auto") runs FAVOR+'s Triton kernels, so the checks
after the first go through them; the first compares the PyTorch kernels. ``--triton`` runs the
checks of the Triton kernels themselves instead (at the float32 matmul precision of training,
"high", where not said otherwise):

* softmax FAVOR+ on the Triton kernels on the device equals the PyTorch kernels on the CPU
  (float32 at "highest" precision, padded);
* the causal kernel's past is bit for bit the same whatever the future holds;
* bf16 autocast at L = 131,072: finite outputs and gradients;
* on real protein batches (tokens of a proteome through an embedding and a q, k, v projection),
  the relative error of the Triton and of the PyTorch kernels against a float64 reference, at
  the float32 matmul precision of training (TF32 on CUDA).

Each check prints one line (PASS / FAIL and the measured error); the exit status is non-zero if
any failed. ``--device cpu`` runs the same checks on the CPU against itself (a dry run: it
checks this script, not an accelerator; the test suite does that); the Triton checks then need
TRITON_INTERPRET=1.

    python benchmarks/cuda_check.py                       # on a GPU
    python benchmarks/cuda_check.py --triton --fasta proteome.fasta.gz
    python benchmarks/cuda_check.py --device cpu --quick  # the dry run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protperf.attention import FastAttention  # noqa: E402
from protperf.model import PerformerConfig, PerformerLM  # noqa: E402
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID, VOCAB_SIZE, encode  # noqa: E402

#: Where --fasta is looked for when not given: the shared proteomes beside the checkout, or a
#: copy carried to the device in .devdata/.
FASTA_CANDIDATES = (
    REPO.parent / "shared" / "data" / "proteomes" / "UP000000625-E.coli.fasta.gz",
    REPO / ".devdata" / "proteome.fasta.gz",
)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def attention_matches_cpu(device: torch.device, length: int) -> dict:
    """FAVOR+ on the device against the CPU: outputs and input gradients, float32."""
    worst = 0.0
    for kernel in ("softmax", "relu"):
        for causal in (True, False):
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(2, 4, length, 32, generator=generator) for _ in range(3))
            mask = torch.zeros(2, length, dtype=torch.bool)
            mask[1, length // 2 :] = True  # the second row padded
            weights = torch.randn(2, 4, length, 32, generator=generator)
            results = []
            for where in (torch.device("cpu"), device):
                attention = FastAttention(
                    head_dim=32, num_features=64, kernel=kernel, causal=causal, chunk_size=64,
                    backend="torch",
                ).to(where)  # fmt: skip
                inputs = [x.detach().to(where).requires_grad_() for x in (q, k, v)]  # leaves
                out = attention(*inputs, key_padding_mask=mask.to(where))
                (out * weights.to(where)).sum().backward()
                results.append([out, *(x.grad for x in inputs)])
            worst = max(
                worst, *(_relative(d, c) for d, c in zip(results[1], results[0], strict=True))
            )
    return {"passed": worst < 1e-4, "measure": f"largest relative error {worst:.2e} (< 1e-4)"}


def long_bf16_is_finite(device: torch.device, length: int) -> dict:
    """bf16 autocast at a long length: outputs and gradients finite, both directions."""
    finite = True
    for causal in (True, False):
        attention = FastAttention(head_dim=64, num_features=256, causal=causal).to(device)
        generator = torch.Generator().manual_seed(1)
        q, k, v = (
            (torch.randn(1, 8, length, 64, generator=generator) * 3).to(device).requires_grad_()
            for _ in range(3)
        )
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        out.float().square().mean().backward()
        finite &= bool(torch.isfinite(out).all()) and all(
            bool(torch.isfinite(x.grad).all()) for x in (q, k, v)
        )
    return {"passed": finite, "measure": f"L = {length:,}, outputs and gradients finite"}


def training_step_bf16(device: torch.device, length: int) -> dict:
    """One bf16-mixed step of a small causal model: finite loss and gradients, weights move."""
    torch.manual_seed(0)
    config = PerformerConfig(dim=128, depth=2, heads=4, ff_dim=256, max_length=length, causal=True)
    model = PerformerLM(config).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(FIRST_RESIDUE_ID, 30, (2, length + 1), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])["loss"]
    loss.backward()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    optimizer.step()
    moved = sum(
        not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters(), strict=True)
    )
    passed = bool(torch.isfinite(loss)) and grads_finite and moved == len(before)
    return {
        "passed": passed,
        "measure": f"loss {float(loss.detach()):.3f}, {moved}/{len(before)} moved",
    }


def decoding_matches_full_forward(device: torch.device, steps: int) -> dict:
    """Greedy decoding by the recurrence equals greedy decoding by the full forward pass."""
    torch.manual_seed(0)
    config = PerformerConfig(
        dim=64, depth=2, heads=4, ff_dim=128, num_features=32, causal=True, dropout=0.0
    )
    model = PerformerLM(config).to(device).eval()
    with torch.no_grad():
        tokens, states = [BOS], None
        logits, states = model.decode_step(torch.tensor([BOS], device=device), states, 0)
        for position in range(1, steps):
            logits[:, :FIRST_RESIDUE_ID] = -torch.inf  # residues only, never EOS
            tokens.append(int(logits.argmax(-1)))
            logits, states = model.decode_step(
                torch.tensor([tokens[-1]], device=device), states, position
            )
        full = model(torch.tensor([tokens], device=device))["logits"][0, :-1]
        full[:, :FIRST_RESIDUE_ID] = -torch.inf
        agree = (full.argmax(-1).cpu() == torch.tensor(tokens[1:])).float().mean().item()
    return {"passed": agree == 1.0, "measure": f"{agree:.0%} of {steps - 1} tokens agree"}


def embedding_ignores_padding(device: torch.device, length: int) -> dict:
    """A protein alone and padded beside a longer one: the same mean embedding (1e-5)."""
    torch.manual_seed(0)
    config = PerformerConfig(dim=64, depth=2, heads=4, ff_dim=128, num_features=32, dropout=0.0)
    model = PerformerLM(config).to(device).eval()
    generator = torch.Generator().manual_seed(2)
    short = torch.randint(FIRST_RESIDUE_ID, 30, (length // 2,), generator=generator)
    long = torch.randint(FIRST_RESIDUE_ID, 30, (length,), generator=generator)
    rows = [torch.cat([torch.tensor([BOS]), s, torch.tensor([EOS])]) for s in (short, long)]
    batch = torch.zeros(2, len(rows[1]), dtype=torch.long)
    mask = torch.ones(2, len(rows[1]), dtype=torch.bool)
    for i, row in enumerate(rows):
        batch[i, : len(row)], mask[i, : len(row)] = row, False
    with torch.no_grad():
        alone = model(rows[0][None].to(device), repr_layers=[2])["representations"][2]
        padded = model(batch.to(device), mask.to(device), repr_layers=[2])["representations"][2]
    n = len(rows[0])
    error = float((alone[0, 1 : n - 1].mean(0) - padded[0, 1 : n - 1].mean(0)).abs().max())
    return {"passed": error < 1e-5, "measure": f"largest difference {error:.1e} (< 1e-5)"}


CHECKS: dict[str, tuple[Callable[[torch.device, int], dict], int, int]] = {
    # name -> (check, size, size with --quick)
    "FAVOR+ equals the CPU (float32, padded)": (attention_matches_cpu, 1000, 200),
    "bf16 autocast stays finite": (long_bf16_is_finite, 32768, 2048),
    "bf16-mixed training step": (training_step_bf16, 8192, 256),
    "decoding recurrence = full forward": (decoding_matches_full_forward, 200, 40),
    "embedding ignores padding": (embedding_ignores_padding, 2000, 200),
}


# ---------------------------------------------------------------------------------------------
# The Triton kernels (--triton)
# ---------------------------------------------------------------------------------------------


def triton_matches_cpu(device: torch.device, length: int) -> dict:
    """Softmax FAVOR+ on the Triton kernels (on the device) against the PyTorch kernels on the
    CPU, both directions, padded: outputs and input gradients, float32 at "highest" precision
    (3xTF32 products, float32 accuracy)."""
    heads, dim, features = _sizes(length)
    worst = 0.0
    for causal in (True, False):
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, heads, length, dim, generator=generator) for _ in range(3))
        mask = torch.zeros(2, length, dtype=torch.bool)
        mask[1, length // 2 :] = True
        weights = torch.randn(2, heads, length, dim, generator=generator)
        results = []
        for where, backend in ((torch.device("cpu"), "torch"), (device, "triton")):
            attention = FastAttention(
                head_dim=dim, num_features=features, causal=causal, backend=backend
            ).to(where)
            inputs = [x.to(where).requires_grad_() for x in (q, k, v)]
            out = attention(*inputs, key_padding_mask=mask.to(where))
            grads = torch.autograd.grad((out * weights.to(where)).sum(), inputs)
            results.append([out, *grads])
        worst = max(worst, *(_relative(d, c) for d, c in zip(results[1], results[0], strict=True)))
    return {"passed": worst < 1e-4, "measure": f"largest relative error {worst:.2e} (< 1e-4)"}


def _sizes(length: int) -> tuple[int, int, int]:
    """(heads, head dim, features): the concat model's 8, 64, 256; for the dry run's short
    lengths (Triton's CPU interpreter) 2, 16, 32."""
    return (8, 64, 256) if length >= 1024 else (2, 16, 32)


def triton_past_ignores_future(device: torch.device, length: int) -> dict:
    """Causal softmax FAVOR+ on the Triton kernels: keys and values after t changed (keys five
    times larger, so a higher running max), outputs up to t bit for bit the same."""
    heads, dim, features = _sizes(length)
    attention = FastAttention(head_dim=dim, num_features=features, causal=True, backend="triton")
    attention = attention.to(device)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, length, dim, generator=generator).to(device) for _ in range(3))
    t = length // 2 + 7  # not at a chunk boundary
    mask = torch.zeros(1, length, dtype=torch.bool, device=device)
    with torch.no_grad():
        before = attention(q, k, v, key_padding_mask=mask)
        k[:, :, t:] *= 5.0
        v[:, :, t:] = -v[:, :, t:]
        after = attention(q, k, v, key_padding_mask=mask)
    same = bool(torch.equal(before[:, :, :t], after[:, :, :t]))
    moved = not torch.equal(before[:, :, t:], after[:, :, t:])
    return {"passed": same and moved, "measure": f"L = {length:,}, past equal: {same}"}


def triton_long_bf16_is_finite(device: torch.device, length: int) -> dict:
    """bf16 autocast at a long length on the Triton kernels: outputs and gradients finite."""
    finite = True
    heads, dim, features = _sizes(length)
    for causal in (True, False):
        attention = FastAttention(
            head_dim=dim, num_features=features, causal=causal, backend="triton"
        ).to(device)
        generator = torch.Generator().manual_seed(1)
        q, k, v = (
            (torch.randn(1, heads, length, dim, generator=generator) * 3)
            .to(device)
            .requires_grad_()
            for _ in range(3)
        )
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        out.float().square().mean().backward()
        finite &= bool(torch.isfinite(out).all()) and all(
            bool(torch.isfinite(x.grad).all()) for x in (q, k, v)
        )
    return {"passed": finite, "measure": f"L = {length:,}, outputs and gradients finite"}


def _proteins(fasta: Path | None) -> list[str]:
    if fasta is None:
        return []
    opener = gzip.open if fasta.suffix == ".gz" else open
    sequences, current = [], []
    with opener(fasta, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if current:
                    sequences.append("".join(current))
                current = []
            else:
                current.append(line.strip())
    if current:
        sequences.append("".join(current))
    return sequences


def protein_batch(length: int, fasta: Path | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Two rows of tokens: proteins joined by <eos> and cut at ``length`` (a concat chunk), and
    one protein alone, padded. Returns tokens (2, L), the padding mask (2, L) and the source."""
    sequences = _proteins(fasta)
    if not sequences:  # no proteome: random residues (said in the check's line)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(FIRST_RESIDUE_ID, 30, (2, length), generator=generator)
        mask = torch.zeros(2, length, dtype=torch.bool)
        mask[1, length // 3 :] = True
        return tokens, mask, "random residues (no FASTA found)"
    stream: list[int] = []
    for sequence in sequences:
        stream += [*encode(sequence).tolist(), EOS]
        if len(stream) >= length:
            break
    alone = next((x for x in sequences if 10 < len(x) < length - 2), sequences[0][: length - 2])
    single = [BOS, *encode(alone).tolist(), EOS]
    tokens = torch.zeros(2, length, dtype=torch.long)
    tokens[0] = torch.tensor(stream[:length])
    tokens[1, : len(single)] = torch.tensor(single)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[1, len(single) :] = True
    return tokens, mask, f"{fasta.name}: a concat chunk and one protein of {len(alone)}, padded"


def protein_accuracy(device: torch.device, length: int, fasta: Path | None = None) -> dict:
    """Relative errors (outputs and the gradients of q, k, v; the largest) of the Triton and of
    the PyTorch kernels against the PyTorch kernels in float64 on the CPU, for q, k, v of real
    protein tokens through an embedding, a LayerNorm and a q, k, v projection (untrained, the
    default initialisations: real residue statistics, not trained weights), at the float32
    matmul precision of training ("high": TF32 on CUDA)."""
    fasta = fasta if fasta is not None else next((p for p in FASTA_CANDIDATES if p.exists()), None)
    tokens, mask, source = protein_batch(length, fasta)
    heads, head_dim, features = _sizes(length)
    dim = heads * head_dim
    torch.manual_seed(0)
    embed, norm = torch.nn.Embedding(VOCAB_SIZE, dim), torch.nn.LayerNorm(dim)
    project = torch.nn.Linear(dim, 3 * dim)
    with torch.no_grad():
        projected = project(norm(embed(tokens))).view(2, length, 3, heads, head_dim)
    q, k, v = projected.permute(2, 0, 3, 1, 4).contiguous()
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    lines, passed = [], True
    try:
        for kernel in ("softmax", "relu"):
            for causal in (True, False):
                reference = FastAttention(
                    head_dim=head_dim, num_features=features, kernel=kernel, causal=causal,
                    backend="torch",
                )  # fmt: skip
                expected = _favor_with_grads(reference.double(), q, k, v, mask, weights, "cpu")
                errors = {}
                for backend in ("triton", "torch"):
                    attention = FastAttention(
                        head_dim=head_dim, num_features=features, kernel=kernel, causal=causal,
                        backend=backend,
                    ).to(device)  # fmt: skip
                    got = _favor_with_grads(attention, q, k, v, mask, weights, device)
                    errors[backend] = max(
                        _relative(a, b) for a, b in zip(got, expected, strict=True)
                    )
                passed &= errors["triton"] <= max(2 * errors["torch"], 1e-3)
                passed &= errors["triton"] < 1e-2
                direction = "causal" if causal else "bidirectional"
                lines.append(f"{kernel} {direction} {errors['triton']:.1e} / {errors['torch']:.1e}")
    finally:
        torch.set_float32_matmul_precision(before)
    return {
        "passed": passed,
        "measure": f"L = {length:,} ({source}); relative error vs float64, Triton / PyTorch: "
        + ", ".join(lines),
    }


def _favor_with_grads(attention, q, k, v, mask, weights, device) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of (out * weights).sum(), in the attention's dtype, on ``device``."""
    dtype = attention.projection.dtype
    inputs = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    out = attention(*inputs, key_padding_mask=mask.to(device))
    grads = torch.autograd.grad((out * weights.to(device, dtype)).sum(), inputs)
    return [out, *grads]


TRITON_CHECKS: dict[str, tuple[Callable[[torch.device, int], dict], int, int]] = {
    "Triton kernels equal the CPU (float32, padded)": (triton_matches_cpu, 1000, 40),
    "Triton causal past ignores the future (bit for bit)": (triton_past_ignores_future, 4096, 80),
    "Triton bf16 autocast stays finite": (triton_long_bf16_is_finite, 131072, 128),
    "protein batches: Triton and PyTorch vs float64": (protein_accuracy, 4096, 96),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--triton", action="store_true", help="check the Triton kernels (instead of the above)"
    )
    parser.add_argument(
        "--fasta", type=Path, help="proteins for the accuracy check (default: a shared proteome)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compared with the CPU in IEEE float32
        torch.backends.cudnn.allow_tf32 = False
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    checks = CHECKS
    if args.triton:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("the Triton checks on the CPU need TRITON_INTERPRET=1")
        # One configuration per kernel: compiling every tuning candidate of every variant the
        # checks meet would take most of their time, and correctness does not depend on it.
        os.environ["PROTPERF_TRITON_AUTOTUNE"] = "0"
        checks = TRITON_CHECKS
    results = {}
    for name, (check, size, quick_size) in checks.items():
        start = time.perf_counter()
        try:
            options = {"fasta": args.fasta} if check is protein_accuracy else {}
            if args.triton:  # as training: TF32 products, except where float32 is compared
                exact = check is triton_matches_cpu
                torch.set_float32_matmul_precision("highest" if exact else "high")
            result = check(device, quick_size if args.quick else size, **options)
        except Exception as error:  # every check reports, whatever breaks
            result = {"passed": False, "measure": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = result
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"{verdict}  {name}: {result['measure']} ({result['seconds']} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "checks": results}, indent=1))
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
