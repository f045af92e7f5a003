"""The processes of an inference verb: one, or many on Lightning Fabric (devices and nodes).

``protperf train`` scales out with Lightning's Trainer; the inference verbs use Lightning Fabric,
which reads the same cluster environments: ``--devices N`` on one machine starts N-1 more
processes running the same command line, and under ``torchrun`` or SLURM the ranks come from the
launcher's variables. One process (the default) imports no Lightning at all, so a short job
starts as fast as before. Several processes share the machine's cores
(:func:`protperf.runtime.share_cores`) and watch each other (:mod:`protperf.peers`): a lost one
stops them all with a message that names it, and the collectives here wait on it no longer.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from protperf import peers, runtime
from protperf.errors import InputError
from protperf.inference import resolve_device

#: How long a rank waits in a collective for a live one: the others wait while rank 0 checks the
#: whole input (about 20 minutes for 100 M proteins), and ranks that finish their share wait for
#: the slowest (shares are equal in tokens, so on equal devices a shard's time or so). A rank
#: that is lost (dead, frozen, its machine gone) stops the run much sooner: protperf.peers.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=4)


@dataclass
class Workers:
    """This process's place among the workers: rank, their number, its device, and collectives
    (plain functions for one process)."""

    rank: int
    world_size: int
    device: torch.device
    broadcast: Callable[[Any], Any] = field(default=lambda obj: obj)
    barrier: Callable[[], None] = field(default=lambda: None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group once every rank is done with collectives."""
        close_process_group()


def close_process_group() -> None:
    """Leave the other processes of a finished multi-process run (:func:`protperf.peers.leave`)
    and destroy the ``torch.distributed`` process group, if any.

    Called once every rank is done with collectives: a gloo group left for the interpreter's
    exit can abort the process there ("terminate called without an active exception", SIGABRT),
    so a run that finished its work would exit non-zero. Not called after an
    exception: a rank that failed while others wait in a collective would hang in the teardown.
    """
    import torch.distributed as dist

    peers.leave()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _watched(collective: Callable[..., Any]) -> Callable[..., Any]:
    """``collective``, which on failure gives this process's watch the time to name the lost
    rank and stop the run (a message, not gloo's traceback) before the error is raised."""

    def run(*args: Any) -> Any:
        try:
            return collective(*args)
        except Exception as error:
            peers.await_verdict(error)
            raise

    return run


def launched_by_cluster() -> bool:
    """Whether torchrun or SLURM started this process as one of several."""
    return runtime.one_of_several()


def start_workers(
    device: str, devices: int, num_nodes: int, *, prog: str = "protperf", resume: str = ""
) -> Workers:
    """One process on ``device`` (cpu, cuda or cuda:N), or ``devices`` x ``num_nodes`` of them
    on the accelerator that ``device`` names, started (or joined) through Lightning Fabric.
    Several processes watch each other: a lost one stops them all, each saying so as ``prog``
    and saying ``resume`` (how to resume) after it."""
    if devices < 1 or num_nodes < 1:
        raise InputError(
            f"--devices and --num-nodes must be at least 1, got {devices}, {num_nodes}"
        )
    resolved = resolve_device(device)
    if devices == 1 and num_nodes == 1 and not launched_by_cluster():
        return Workers(rank=0, world_size=1, device=resolved)
    if resolved.index is not None:
        raise InputError(
            f"--device {device} names one GPU; with --devices give the kind alone (cuda)"
        )
    if resolved.type == "cuda" and devices > torch.cuda.device_count():
        raise InputError(
            f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    runtime.share_cores(devices)  # before the launcher starts the others: they inherit it
    try:
        fabric = Fabric(
            accelerator=resolved.type,
            devices=devices,
            num_nodes=num_nodes,
            strategy=DDPStrategy(timeout=COLLECTIVE_TIMEOUT),
        )
        fabric.launch()
    except (ValueError, RuntimeError) as error:  # settings the launcher's contradict
        raise InputError(f"--devices {devices} --num-nodes {num_nodes}: {error}") from error
    launcher = getattr(fabric.strategy, "launcher", None)
    peers.watch_peers(rank=fabric.global_rank, world_size=fabric.world_size, prog=prog,
                      resume=resume, children=getattr(launcher, "procs", ()))  # fmt: skip
    return Workers(
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        device=fabric.device,
        broadcast=_watched(lambda obj: fabric.broadcast(obj, src=0)),
        barrier=_watched(fabric.barrier),
    )
