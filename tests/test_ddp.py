"""Two-process DDP on the CPU (gloo, real processes started by torchrun): ranks stay identical,
metrics equal a single-process computation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from lm_data import write_dataset

from protperf.data.datamodule import LoaderConfig, ProteinDataModule
from protperf.lit import BidirectionalLM, LMMetrics
from protperf.seeds import derive_seed

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from protperf import train

    out, argv = Path(sys.argv[1]), sys.argv[2:]
    result = train.train(**train.parse(argv))  # fit, then test and ood
    rank = result.trainer.global_rank
    torch.save(result.module.model.state_dict(), out / f"rank{rank}.pt")
    metrics = {k: float(v) for k, v in result.trainer.callback_metrics.items() if "/" in k}
    metrics.update(result.trainer.validate(result.module, datamodule=result.datamodule, verbose=False)[0])
    (out / f"metrics{rank}.json").write_text(json.dumps(metrics))
    train.close_process_group()  # as `protperf train` does: gloo can abort an exit without it
    """
)

MODEL = {"dim": 32, "depth": 2, "heads": 4, "ff_dim": 64, "max_length": 64, "num_features": 16}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_metrics(module: BidirectionalLM, data, split: str) -> dict[str, float]:
    datamodule = ProteinDataModule(
        data, max_length=64, loader=LoaderConfig(batch_size=5, num_workers=0), seed=0
    )
    metrics = LMMetrics()
    module.eval()
    with torch.no_grad():
        for batch in datamodule.eval_dataloader(split):
            metrics.update(*module.compute_step(module.prepare_batch(batch))[1])
    return {
        f"{split}/accuracy": metrics.accuracy.compute().item(),
        f"{split}/perplexity": metrics.perplexity.compute().item(),
    }


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, proteome_dir):
    fasta = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0]
    data = write_dataset(tmp_path / "data", fasta, concat_length=128)
    (tmp_path / "worker.py").write_text(WORKER)
    args = [
        "--data", str(data), "--run-dir", str(tmp_path / "run"), "--bidirectional",
        *(f"--model.{key}={value}" for key, value in MODEL.items()), "--model.kernel=softmax",
        "--redraw-every=2", "--trainer.max_steps=5", "--trainer.val_check_interval=5",
        "--trainer.limit_val_batches=1.0", "--loader.batch_size=4", "--loader.eval_batch_size=3",
        "--loader.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false", "--checkpoint-every=5",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONWARNINGS": "ignore",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(tmp_path / "worker.py"),
        str(tmp_path), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"ranks differ in {key}"
    # Random features: identical on both ranks and redrawn from the global step (last at step 4).
    module = BidirectionalLM({**MODEL, "kernel": "softmax"}, redraw_every=2)
    reference = module.model.blocks[0].attn.attention.projection.clone()
    module.model.redraw_features(derive_seed(0, 0x72656472, 4))
    assert torch.equal(
        states[0]["blocks.0.attn.attention.projection"],
        module.model.blocks[0].attn.attention.projection,
    )
    assert not torch.equal(states[0]["blocks.0.attn.attention.projection"], reference)

    # Metrics (reduced over uneven shards) equal the single-process computation.
    module.model.load_state_dict(states[0])
    ddp = [json.loads((tmp_path / f"metrics{rank}.json").read_text()) for rank in (0, 1)]
    clocks = [metrics.pop("time/train_seconds") for metrics in ddp]  # each rank's own clock
    assert all(seconds > 0 for seconds in clocks)
    assert ddp[0] == ddp[1]
    for split in ("valid", "test", "ood"):
        single = _single_process_metrics(module, data, split)
        for key, value in single.items():
            assert ddp[0][key] == pytest.approx(value, rel=1e-5), key


def test_close_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from protperf.train import close_process_group

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()
    close_process_group()  # no group: nothing to do, no error
    assert not dist.is_initialized()
