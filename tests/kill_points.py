"""Run ``protperf`` in this process and SIGKILL it at its N-th kill point (crash tests).

    python kill_points.py VERB [OPTIONS...]

A kill point is a call that writes or publishes output: ``os.fsync``, ``os.replace``,
``os.rename``, ``os.link``, ``os.unlink``, ``os.rmdir``, a write into an HDF5 dataset
(``h5py.Dataset.__setitem__`` and ``resize``) and ``torch.save``. Environment:

- ``PROTPERF_KILL_AT``: the number of the point to die at (1 is the first); 0 or unset never
  kills, and the number of points met is written to ``PROTPERF_KILL_COUNT`` (a file) at exit.
- ``PROTPERF_KILL_WITHIN``: comma-separated ``module:function`` names; only points met while
  one of these runs are counted (e.g. ``protperf.export:export_model``).
- ``PROTPERF_KILL_DELAY``: seconds; at a ``torch.save`` point the kill comes from a timer this
  long after the write starts (a random time into it), not before it.

The kill is ``os.kill(os.getpid(), SIGKILL)``: no handler, no ``finally``, no flush runs, as
when the machine's out-of-memory killer or a scheduler ends a job.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading

KILL_AT = int(os.environ.get("PROTPERF_KILL_AT") or 0)
DELAY = float(os.environ.get("PROTPERF_KILL_DELAY") or 0)
_met = 0
_inside = 0
_counting_everywhere = not os.environ.get("PROTPERF_KILL_WITHIN")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _point(*, delayed: bool = False) -> None:
    global _met
    if not (_counting_everywhere or _inside):
        return
    _met += 1
    if _met == KILL_AT:
        if delayed and DELAY > 0:
            threading.Timer(DELAY, _die).start()
        else:
            _die()


def _kill_point(function, *, delayed: bool = False):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _point(delayed=delayed)
        return function(*args, **kwargs)

    return wrapper


def _scope(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        global _inside
        _inside += 1
        try:
            return function(*args, **kwargs)
        finally:
            _inside -= 1

    return wrapper


def install() -> None:
    """Wrap every kill point (and the functions that scope them)."""
    import h5py
    import torch

    for name in ("fsync", "replace", "rename", "link", "unlink", "rmdir"):
        setattr(os, name, _kill_point(getattr(os, name)))
    for name in ("__setitem__", "resize"):
        setattr(h5py.Dataset, name, _kill_point(getattr(h5py.Dataset, name)))
    torch.save = _kill_point(torch.save, delayed=True)
    for spec in filter(None, os.environ.get("PROTPERF_KILL_WITHIN", "").split(",")):
        module_name, _, qualified = spec.partition(":")
        owner = importlib.import_module(module_name)
        *path, attribute = qualified.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, attribute, _scope(getattr(owner, attribute)))


def main(argv: list[str]) -> int:
    install()
    from protperf import cli

    status = cli.main(argv)
    count_file = os.environ.get("PROTPERF_KILL_COUNT")
    if count_file:
        with open(count_file, "w") as handle:
            handle.write(str(_met))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
