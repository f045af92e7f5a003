"""Failure detection across the processes of a multi-process run (embed's workers, train's DDP).

torch.distributed notices a lost process only inside a collective, and only when the lost
process's sockets were closed. A process that freezes (SIGSTOP, a hung driver) or whose machine
is lost (nothing closes the socket) holds the others in the collective until the process group's
timeout, which must stay hours long: rank 0 checks and merges whole databases, and writes large
checkpoints, while the others wait. So every process of a multi-process run also runs a watch of
two daemon threads, which beat whatever the main thread waits on:

- the heartbeat counts this rank's key up every few seconds in the run's own TCPStore (the store
  the process group rendezvoused through: rank 0's under Lightning and SLURM, the agent's under
  torchrun) and reads the keys it watches: rank 0 reads every rank's, the others rank 0's, each
  rank those of the ranks on its machine that have finished, and a verdict another rank may have
  published;
- the judge blocks on nothing: a rank whose count stops moving for the peer timeout
  (``PROTPERF_PEER_TIMEOUT``, 180 s by default), or a store that stops answering for as long, is
  lost. Two signs come sooner, within seconds: a process on this machine that ended without
  finishing (its pid), and rank 0's store refusing connections (its process ended).

A lost rank stops the run: every process prints one line naming it and how to resume, and exits
with :data:`PEER_LOST`; output already written (shards, checkpoints) stays, so the same command
resumes. A frozen rank is only told from a slow one by the timeout, which is why it is minutes
long; a rank that dies is found as soon as its process is seen gone. Waiting in a collective for
a slow but live rank trips nothing, however long it lasts.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from protperf.errors import InputError

#: Seconds without a sign of life after which a rank is lost: long enough for a loaded machine's
#: threads, short enough that N-1 GPUs do not wait long for a lost node.
DEFAULT_PEER_TIMEOUT = 180.0
PEER_TIMEOUT_VARIABLE = "PROTPERF_PEER_TIMEOUT"
#: Exit status of a process that stopped because another was lost (EX_TEMPFAIL: run it again).
PEER_LOST = 75
#: At most this many seconds between two heartbeats.
_MAX_INTERVAL = 5.0
_VERDICT = "verdict"

_watch: PeerWatch | None = None


def peer_timeout() -> float:
    """The peer timeout in seconds: ``$PROTPERF_PEER_TIMEOUT``, else :data:`DEFAULT_PEER_TIMEOUT`."""
    text = os.environ.get(PEER_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_PEER_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"{PEER_TIMEOUT_VARIABLE}={text!r}: give the seconds, e.g. 180")
    return seconds


def _process_ended(pid: int) -> bool:
    """Whether process ``pid`` of this machine is gone or a zombie (ended, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel, which counts zombies as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` (or one it chains) is torch.distributed's: a collective or the store
    failed, which a lost peer causes."""
    import torch.distributed as dist

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, getattr(dist, "DistError", ())):
            return True
        if isinstance(error, RuntimeError) and any(
            word in str(error) for word in ("gloo", "NCCL", "Connection closed", "Connection reset")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


class PeerWatch:
    """The watch of one process (see the module docstring); start it once the process group is
    up, :meth:`leave` when this process is done with the others.

    Args:
        rank: this process's global rank.
        world_size: the number of processes.
        prog: the command, for the message (``protperf embed``).
        resume: how to resume, the end of the message ("run the same command again ...").
        children: the processes this one launched (Lightning's launcher), killed when it stops
            because a rank was lost: a frozen one would otherwise linger.
        timeout: the peer timeout in seconds (default: :func:`peer_timeout`).
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        prog: str,
        resume: str,
        children: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> None:
        self.rank, self.world_size, self.prog, self.resume = rank, world_size, prog, resume
        self.children = list(children)
        self.timeout = timeout if timeout is not None else peer_timeout()
        self.interval = min(_MAX_INTERVAL, max(0.1, self.timeout / 12))
        self.host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.port = int(os.environ.get("MASTER_PORT", "0") or 0)
        # Under torchrun the store is its agent's, which outlives rank 0's process.
        self.store_in_rank0 = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
        self._store: Any = None
        self._lock = threading.Lock()  # one store operation at a time
        self._stop = threading.Event()
        self._leaving = False
        self._lost = threading.Lock()  # held by the thread that stops the process
        # What the heartbeat learnt, read by the judge (plain values: atomic under the GIL).
        self._beats: dict[int, int] = {}
        self._changed: dict[int, float] = {}
        self._done: set[int] = set()
        self._where: dict[int, tuple[str, int]] = {}
        self._verdict: tuple[int, str] | None = None
        self._refused = False
        self._last_round = self._round_started = time.monotonic()
        self._threads: list[threading.Thread] = []

    # -- running ------------------------------------------------------------------------------

    def start(self) -> PeerWatch:
        """Connect to the run's store, say where this process runs, and start both threads."""
        import torch.distributed as dist

        prefix = f"protperf/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        client = dist.TCPStore(
            self.host, self.port, is_master=False, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=max(60.0, self.timeout)),
        )  # fmt: skip
        self._store = dist.PrefixStore(prefix, client)
        self._store.set(f"where/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        now = time.monotonic()
        self._last_round = self._round_started = now
        self._changed = {rank: now for rank in range(self.world_size)}
        for target in (self._heartbeat, self._judge):
            thread = threading.Thread(target=target, name=f"protperf{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _watched(self) -> list[int]:
        """The ranks whose counts this one reads: every other rank for rank 0, else rank 0."""
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        return others if self.rank == 0 else [0]

    def _local(self) -> list[int]:
        """The other ranks on this machine (known once each said where it runs)."""
        here = socket.gethostname()
        return [r for r, (host, _) in self._where.items() if host == here and r != self.rank]

    def _ended(self, rank: int) -> bool:
        """Whether local ``rank``'s process ended."""
        return _process_ended(self._where[rank][1])

    def _store_refuses(self) -> bool:
        """Whether rank 0's store refuses connections: its process ended. A plain connection,
        so that a store that is gone is never asked (torch logs each failed request at length)."""
        if not self.store_in_rank0 or self.rank == 0:
            return False
        try:
            socket.create_connection((self.host, self.port), timeout=self.interval).close()
        except ConnectionRefusedError:
            return True
        except OSError:  # unreachable or slow: only the timeout can tell
            return False
        return False

    def _heartbeat(self) -> None:
        store = self._store
        while not self._stop.is_set():
            started = time.monotonic()
            if self._store_refuses():
                self._refused = True
                return
            try:
                with self._lock:
                    store.add(f"beat/{self.rank}", 1)
                    beats = {rank: store.add(f"beat/{rank}", 0) for rank in self._watched()}
                    asked = set(self._watched()) | set(self._local())
                    done = {rank for rank in asked if store.add(f"done/{rank}", 0)}
                    verdict = store.get(_VERDICT) if store.check([_VERDICT]) else None
                    keys = [f"where/{rank}" for rank in range(self.world_size)]
                    if len(self._where) < self.world_size and store.check(keys):
                        for rank, value in enumerate(store.multi_get(keys)):
                            host, _, pid = value.decode().rpartition(" ")
                            self._where[rank] = (host, int(pid))
            except Exception:  # the store is gone or failing: the judge times it
                self._stop.wait(self.interval)
                continue
            now = time.monotonic()
            for rank, count in beats.items():
                if self._beats.get(rank) != count:
                    self._beats[rank], self._changed[rank] = count, now
            self._done |= done
            if verdict is not None and self._verdict is None:
                rank, _, reason = verdict.decode().partition("\t")
                self._verdict = (int(rank), reason)
            self._last_round, self._round_started = now, started
            self._stop.wait(self.interval)

    def _judge(self) -> None:
        last = time.monotonic()
        ended: dict[int, float] = {}  # local rank -> when its process was first seen gone
        silent = f"{self.timeout:.0f} s (stopped, hung, or its machine was lost)"
        while not self._stop.wait(self.interval / 2):
            now = time.monotonic()
            if now - last > self.timeout / 2:  # this process was stopped or starved: start over
                self._changed = dict.fromkeys(self._changed, now)
                self._last_round = self._round_started = now
            last = now
            if self._leaving:
                continue
            if self._verdict is not None:
                self._stop_run(*self._verdict, publish=False)
            if self._refused:
                self._stop_run(0, "ended (its store refuses connections)", publish=False)
            for rank in self._local():
                if rank in self._done or not self._ended(rank):
                    continue
                first = ended.setdefault(rank, now)
                # A rank that finished said so before it exited: believe the end once a
                # heartbeat that started after it found no such word (or the store is silent).
                heard = self._round_started > first or now - first > 4 * self.interval
                if heard and rank not in self._done:
                    self._stop_run(rank, "ended before it finished (killed, or out of memory)")
            for rank in self._watched():
                if rank not in self._done and now - self._changed[rank] > self.timeout:
                    self._stop_run(rank, f"gave no sign of life for {silent}")
            store_here = self.rank == 0 and self.store_in_rank0
            if now - self._last_round > self.timeout and not store_here:
                if self.store_in_rank0:
                    self._stop_run(0, f"(which holds the run's store) did not answer for {silent}",
                                   publish=False)  # fmt: skip
                where = f"the run's store at {self.host}:{self.port}"
                self._stop_run(-1, f"{where} did not answer for {silent}", publish=False)

    def _stop_run(self, rank: int, reason: str, *, publish: bool = True) -> None:
        """Say which rank was lost and how to resume, and exit with :data:`PEER_LOST`."""
        if not self._lost.acquire(blocking=False):
            return
        if publish:  # the others learn it at their next heartbeat; never wait on a lost store
            verdict = f"{rank}\t{reason}"
            thread = threading.Thread(target=self._publish, args=(verdict,), daemon=True)
            thread.start()
            thread.join(self.interval)
            if self.rank == 0 and self.store_in_rank0 and self.world_size > 2:
                time.sleep(2 * self.interval)  # the store leaves with this process
        who = reason if rank < 0 else f"rank {rank} of {self.world_size} {reason}"
        sys.stderr.write(f"\n{self.prog}: error: {who}; {self.resume}\n")
        sys.stderr.flush()
        from protperf.durable import discard_unfinished

        discard_unfinished()
        for child in self.children:
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)  # a stopped process too
        os._exit(PEER_LOST)

    def _publish(self, verdict: str) -> None:
        try:
            with self._lock:
                self._store.compare_set(_VERDICT, "", verdict)
        except Exception:
            pass

    def await_verdict(self, error: BaseException) -> None:
        """After ``error`` in the main thread: when it is torch.distributed's (a lost peer makes
        collectives fail), give the judge time to name the lost rank and stop the process;
        return when nothing was found, so that the caller raises ``error``."""
        if self._leaving or not _is_collective_failure(error):
            return
        deadline = time.monotonic() + self.timeout + 4 * self.interval
        while time.monotonic() < deadline:
            time.sleep(self.interval / 2)

    def leave(self) -> None:
        """This process is done with the others: say so, and stop watching. Rank 0 first waits
        (at most the peer timeout) for the others to leave: under Lightning and SLURM the
        store they need lives in its process."""
        if self._leaving:
            return
        self._leaving = True
        if self.rank != 0:
            if self._lock.acquire(timeout=self.timeout):
                try:
                    self._store.add(f"done/{self.rank}", 1)
                except Exception:  # rank 0 is gone: nobody waits for the word
                    pass
                finally:
                    self._lock.release()
        else:
            deadline = time.monotonic() + self.timeout
            waiting = list(range(1, self.world_size))
            while waiting and time.monotonic() < deadline:
                if self._lock.acquire(timeout=self.interval):
                    try:
                        waiting = [r for r in waiting if not self._store.add(f"done/{r}", 0)]
                    except Exception:  # the store is failing: the ranks' own ends tell
                        pass
                    finally:
                        self._lock.release()
                local = set(self._local())
                waiting = [r for r in waiting if not (r in local and self._ended(r))]
                if waiting:
                    time.sleep(min(0.1, self.interval))
        self._stop.set()


def take_over_child_observer() -> None:
    """Stop Lightning's watch of the processes its launcher started, which this one replaces.

    Lightning's observer SIGKILLs the launching process itself (rank 0) as soon as a child ends
    with an error, so rank 0 could never say which rank was lost or how to resume. Given an
    empty list, it ends at its next look without killing anything.
    """
    try:
        from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._child_processes = []


def watch_peers(
    *, rank: int, world_size: int, prog: str, resume: str, children: Sequence[Any] = ()
) -> PeerWatch | None:
    """Start this process's :class:`PeerWatch` (once; None for a single process). Call it once
    the process group is up; ``children`` are the processes a launcher in this one started."""
    global _watch
    if world_size < 2:
        return None
    if _watch is None:
        if children:
            take_over_child_observer()
        _watch = PeerWatch(rank=rank, world_size=world_size, prog=prog, resume=resume,
                           children=children).start()  # fmt: skip
    return _watch


def await_verdict(error: BaseException) -> None:
    """:meth:`PeerWatch.await_verdict` of this process's watch, if it has one."""
    if _watch is not None:
        _watch.await_verdict(error)


def leave() -> None:
    """:meth:`PeerWatch.leave` of this process's watch, if it has one, and forget it."""
    global _watch
    if _watch is not None:
        _watch.leave()
        _watch = None
