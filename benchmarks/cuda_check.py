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

Each check prints one line (PASS / FAIL and the measured error); the exit status is non-zero if
any failed. ``--device cpu`` runs the same checks on the CPU against itself (a dry run: it
checks this script, not an accelerator; the test suite does that).

    python benchmarks/cuda_check.py                       # on a GPU
    python benchmarks/cuda_check.py --device cpu --quick  # the dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protperf.attention import FastAttention  # noqa: E402
from protperf.model import PerformerConfig, PerformerLM  # noqa: E402
from protperf.tokenizer import BOS, EOS, FIRST_RESIDUE_ID  # noqa: E402


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
                    head_dim=32, num_features=64, kernel=kernel, causal=causal, chunk_size=64
                ).to(where)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compared with the CPU in IEEE float32
        torch.backends.cudnn.allow_tf32 = False
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    results = {}
    for name, (check, size, quick_size) in CHECKS.items():
        start = time.perf_counter()
        try:
            result = check(device, quick_size if args.quick else size)
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
