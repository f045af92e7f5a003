"""How fast each ``protperf`` verb starts: ``protperf VERB --help`` against its own imports.

A verb's start is the interpreter, the verb module's imports (torch and Lightning for most) and
the command-line mechanism (protperf.commandline: the parser built from the function's
signature and docstring). The peer of each verb is the same Python importing the verb's module
and nothing else, so the ratio is what the command line adds on top of what the verb cannot
avoid; ``protperf --help`` is compared with a bare interpreter.

    python benchmarks/startup.py [--repeats 7]

Prints a Markdown table: median wall seconds over interleaved repeats, each in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from protperf.cli import VERBS


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def cases() -> list[tuple[str, list[str], list[str]]]:
    """(label, the protperf command, its peer) for the bare command and every verb."""
    python = sys.executable
    rows = [("protperf --help", [python, "-m", "protperf.cli", "--help"], [python, "-c", "pass"])]
    for verb, (module, _) in VERBS.items():
        rows.append(
            (
                f"protperf {verb} --help",
                [python, "-m", "protperf.cli", verb, "--help"],
                [python, "-c", f"import {module}"],
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (median)")
    args = parser.parse_args(argv)
    rows = cases()
    times: dict[str, list[float]] = {label: [] for label, *_ in rows}
    peers: dict[str, list[float]] = {label: [] for label, *_ in rows}
    for _, command, peer in rows:  # warm the file cache and bytecode once
        _seconds(command)
        _seconds(peer)
    for _ in range(args.repeats):  # interleaved, so that a busy moment hits both alike
        for label, command, peer in rows:
            times[label].append(_seconds(command))
            peers[label].append(_seconds(peer))
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; median of {args.repeats} runs\n"
    )
    print("| command | s | peer | peer s | added ms | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for label, _, peer in rows:
        ours, theirs = statistics.median(times[label]), statistics.median(peers[label])
        peer_text = " ".join(peer[1:]).replace("-c ", "python -c '", 1) + "'"
        print(
            f"| `{label}` | {ours:.3f} | `{peer_text}` | {theirs:.3f} | "
            f"{1000 * (ours - theirs):.0f} | {ours / theirs:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
