"""Throughput and peak memory of `motian clean` and `motian encode` on the bundled corpus.

Each stage runs as a real `motian` subprocess (as a user runs it) with 1 and with 2 worker
processes. A sampler thread reads the resident memory of the whole process tree (the command
and its workers) from /proc every 50 ms; the peak of the sum is reported. Throughput is MB of
UTF-8 input text per second of wall-clock time, start-up included.

    python benchmarks/data_pipeline.py [--inputs pd98 reviews] [--workers 1 2] [--out runs/bench]

Prints a Markdown table; docs/data_pipeline.md holds the numbers measured on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from motian.data.sources import iter_documents


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def _tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over `root` and all its descendants (Linux /proc)."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_sampled(cmd: list[str], sample: Callable[[int], None], env: dict | None = None
                ) -> float:
    """Run `cmd`, calling `sample(pid)` every 50 ms while it runs; return its seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            sample(proc.pid)
            time.sleep(0.05)

    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return seconds


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return (seconds, peak resident bytes of its process tree)."""
    peak = 0

    def sample(pid: int) -> None:
        nonlocal peak
        peak = max(peak, _tree_rss_bytes(pid))

    return run_sampled(cmd, sample), peak


def text_megabytes(inputs: list[str]) -> float:
    return sum(len(d.text.encode("utf-8")) for d in iter_documents(inputs)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+", default=["pd98", "reviews"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_data"))
    args = ap.parse_args()
    motian = [sys.executable, "-m", "motian.cli"]
    shutil.rmtree(args.out, ignore_errors=True)
    raw_mb = text_megabytes(args.inputs)

    # One cleaned corpus and one vocabulary serve every encode run.
    subprocess.run(motian + ["clean", "--inputs", *args.inputs, "--out", str(args.out / "c"),
                             "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    clean_mb = text_megabytes([str(args.out / "c")])
    subprocess.run(motian + ["tokenizer", "--inputs", str(args.out / "c"),
                             "--out", str(args.out / "tok")], check=True, stdout=subprocess.DEVNULL)

    rows = []
    for n in args.workers:
        sec, peak = run_measured(motian + ["clean", "--inputs", *args.inputs, "--out",
                                           str(args.out / f"clean{n}"), "--workers", str(n),
                                           "--no-resume", "--no-progress"])
        rows.append(("clean", n, raw_mb, sec, peak))
        sec, peak = run_measured(motian + ["encode", "--inputs", str(args.out / "c"), "--out",
                                           str(args.out / f"enc{n}"), "--tokenizer",
                                           str(args.out / "tok"), "--workers", str(n),
                                           "--no-resume", "--no-progress"])
        rows.append(("encode", n, clean_mb, sec, peak))

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"inputs: {' '.join(args.inputs)} ({raw_mb:.1f} MB raw text, {clean_mb:.1f} MB cleaned)")
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("\n| stage | workers | MB in | seconds | MB/s | peak RSS (MB) | speed-up vs 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = {stage: mb / sec for stage, n, mb, sec, _ in rows if n == min(args.workers)}
    for stage, n, mb, sec, peak in rows:
        print(f"| {stage} | {n} | {mb:.1f} | {sec:.1f} | {mb / sec:.2f} | {peak / 1e6:.0f} | "
              f"{(mb / sec) / base[stage]:.2f}× |")


if __name__ == "__main__":
    main()
