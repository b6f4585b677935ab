"""Peak memory and time of one training step at long sequence lengths (issue 19): full
attention against Longformer's sliding window and Transformer-XL's segment recurrence.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/long.py              # 512 .. 8k, 2-5 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long.py --threads 1  # shared machine (docs/long.md)
    .venv/bin/python benchmarks/long.py --lengths 512 1024 --limit 20  # a quick look

The demo model shape (2 layers x 128 hidden, 4 heads, FFN 512, Pre-LN, no dropout, vocab
21128), batch 1, fp32, forward + backward (no optimizer). Three variants:

- `full`: `MaskedLM` with ALiBi, attention="full", the model's normal path (SDPA; which
  kernel it takes on this machine is printed, read from the profiler);
- `sliding`: the same with attention="sliding", window 256 per side, global [CLS];
  both are MLM steps with the loss at 15% of the positions (the output layer at those rows);
- `xl`: `TransformerXLLM` (causal, its relative encoding), segments of 512 and a memory of
  512: L / 512 segments in sequence, each one forward + backward with the memory of the last
  512 states per layer (full from the start, as in a run in progress), the time summed. Its
  loss is next-token prediction at every position of the segment, as XL trains.

Each (variant, length) cell runs in a fresh subprocess: build, one untimed warm-up step, then
the median of 3 timed steps.

`--variants full-eager` adds full attention through SDPA's math backend (the same model and
loss): the textbook computation, which keeps the (heads, L, L) scores and probabilities of
every layer for the backward pass, i.e. the full attention Longformer's memory claim is
measured against; a second table compares the sliding window with it. Peak memory is VmHWM (peak resident set) minus VmRSS read just
before the model is built, both from /proc/self/status: what the step added (weights,
gradients, activations, allocator slack). Why RSS: torch has no allocator statistics for CPU
tensors (they come straight from malloc), `tracemalloc` sees only Python objects, and the
profiler's `profile_memory` counts live tensors but not what the process really had to hold;
a fresh process per cell keeps one cell's freed memory from hiding another's peak. Not
`resource.getrusage().ru_maxrss`: Linux carries the parent's peak over fork + exec, so a
small child would report the parent's size.

A cell whose warm-up step takes more than --limit seconds is not timed further ("skipped");
a cell predicted to exceed it from the previous length (x4 for full attention, x2 for the
linear ones) is not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from motian.model import MaskedLM, ModelConfig, preset
from motian.model.xl import TransformerXLLM, next_memory

LENGTHS = (512, 1024, 2048, 4096, 8192)
VARIANTS = ("full", "sliding", "xl")
# full attention through SDPA's math backend: the textbook computation, which stores the
# (heads, L, L) scores and probabilities of every layer for the backward pass
EAGER = "full-eager"
GROWTH = {"full": 4.0, EAGER: 4.0, "sliding": 2.0, "xl": 2.0}  # step time when L doubles
CLS = 101  # [CLS] of the bert-base-chinese vocabulary


def demo_config(variant: str, window: int, vocab: int) -> ModelConfig:
    """The demo model (motian-demo.yaml's shape) as each variant needs it."""
    shape = dict(vocab_size=vocab, hidden=128, layers=2, heads=4, ffn=512, norm="pre",
                 dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-6)
    if variant == "xl":  # xl-demo.yaml: causal, XL's own relative encoding
        return preset("tiny", **shape, position="sinusoidal", causal=True)
    if variant == "sliding":
        return preset("tiny", **shape, position="alibi", attention="sliding",
                      attention_window=window, global_attention="cls")
    return preset("tiny", **shape, position="alibi")


def build_step(variant: str, length: int, window: int, segment: int, memory: int,
               vocab: int) -> Callable[[], float]:
    """A closure doing one forward + backward of `variant` over `length` tokens; returns the
    loss (summed over the segments for xl)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    config = demo_config(variant, window, vocab)
    stream = torch.randint(5, vocab, (1, length + 1), generator=g)
    if variant == "xl":
        return _xl_step(TransformerXLLM(config, memory=memory).train(), stream, segment, memory)
    model = MaskedLM(config).train()

    def kernel():  # a fresh context per step (one from contextlib enters once)
        return sdpa_kernel(SDPBackend.MATH) if variant == EAGER else contextlib.nullcontext()

    x = stream[:, :length].clone()
    x[:, 0] = CLS  # the global token of the sliding variant
    positions = (torch.rand(length, generator=g) < 0.15).nonzero().squeeze(1)  # batch 1: flat
    targets = torch.randint(5, vocab, positions.shape, generator=g)

    def step() -> float:
        with kernel():
            loss = model(x, mlm_positions=positions, mlm_labels=targets).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _xl_step(model: TransformerXLLM, stream: torch.Tensor, segment: int,
             memory: int) -> Callable[[], float]:
    """Segments of `segment` tokens in order, each trained with the memory the previous one
    left (no gradient crosses a segment: the memory is detached, as in the paper)."""
    H = model.config.hidden
    state = [torch.zeros(1, memory, H) for _ in model.blocks]  # a full memory from the start
    filled = torch.full((1,), float(memory))
    length = stream.shape[1] - 1

    def step() -> float:
        nonlocal state
        total = 0.0
        for start in range(0, length, segment):
            ids = stream[:, start:min(start + segment, length)]
            targets = stream[:, start + 1:start + 1 + ids.shape[1]]
            out = model(ids, state, filled)
            loss = F.cross_entropy(out.logits.flatten(0, 1), targets.reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)
            state = next_memory(state, out.hidden, memory)
            total += loss.item()
        return total

    return step


def proc_status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_cell(variant: str, length: int, window: int = 256, segment: int = 512,
             memory: int = 512, vocab: int = 21128, repeats: int = 3,
             limit_s: float = 60.0) -> dict:
    """One cell, in this process: seconds per step (median of `repeats` after a warm-up) and
    MiB of peak RSS added; {"skipped": seconds} when the warm-up step took over `limit_s`."""
    before = proc_status_mib("VmRSS")
    step = build_step(variant, length, window, segment, memory, vocab)
    start = time.perf_counter()
    loss = step()
    warmup = time.perf_counter() - start
    if not loss == loss:  # NaN: a broken variant must not be reported as fast
        raise RuntimeError(f"{variant} at {length}: loss is NaN")
    if warmup > limit_s:
        return {"skipped": warmup}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "spread": [min(times), max(times)],
            "peak_mib": proc_status_mib("VmHWM") - before}


def cell_in_subprocess(variant: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--cell", variant, str(length), "--threads",
           str(args.threads), "--window", str(args.window), "--limit", str(args.limit)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             timeout=args.limit * 5 + 60)
    except subprocess.TimeoutExpired:
        return {"skipped": args.limit}
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_attention_kernel(length: int = 512) -> str:
    """The aten attention op(s) a full-attention forward runs here, read from the profiler."""
    model = MaskedLM(demo_config("full", 256, 1000)).train()
    x = torch.randint(5, 1000, (1, length))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    names = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key
                    or e.key in ("aten::softmax", "aten::_softmax")})
    return ", ".join(names) or "no SDPA op seen"


def describe(cell: dict | None, limit: float) -> tuple[str, str]:
    """(time, memory) columns of one cell."""
    if cell is None:
        return f"skipped: >{limit:.0f} s (predicted)", ""
    if "skipped" in cell:
        return f"skipped: >{limit:.0f} s", ""
    return f"{cell['seconds'] * 1e3:,.0f} ms", f"{cell['peak_mib']:,.0f} MiB"


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or key not in a or key not in b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def print_table(results: dict[tuple[str, int], dict | None], lengths: list[int],
                limit: float) -> None:
    print("| L | full: time | full: peak | sliding: time | sliding: peak | XL: time | "
          "XL: peak | sliding/full mem | sliding/full time | XL/full mem | XL/full time |")
    print("|---" * 11 + "|")
    for L in lengths:
        cells = [results.get((v, L)) for v in VARIANTS]
        cols = [c for cell in cells for c in describe(cell, limit)]
        full, sliding, xl = cells
        print(f"| {L:,} | " + " | ".join(cols) + " | "
              + " | ".join([ratio(sliding, full, "peak_mib"), ratio(sliding, full, "seconds"),
                            ratio(xl, full, "peak_mib"), ratio(xl, full, "seconds")]) + " |")


def print_eager_table(results: dict[tuple[str, int], dict | None], lengths: list[int],
                      limit: float) -> None:
    """The sliding window against full attention that materialises its (L, L) scores."""
    print("\n| L | eager full: time | eager full: peak | sliding/eager-full mem | "
          "sliding/eager-full time |\n|---|---|---|---|---|")
    for L in lengths:
        eager, sliding = results.get((EAGER, L)), results.get(("sliding", L))
        print(f"| {L:,} | " + " | ".join(describe(eager, limit)) + " | "
              + f"{ratio(sliding, eager, 'peak_mib')} | {ratio(sliding, eager, 'seconds')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=[*VARIANTS, EAGER])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per step at most")
    parser.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)  # child: variant length
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cell:
        variant, length = args.cell[0], int(args.cell[1])
        print(json.dumps(run_cell(variant, length, window=args.window, limit_s=args.limit)))
        return
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} at start; demo shape, batch 1, fp32, fwd + bwd")
    print(f"full attention runs: {full_attention_kernel()}")
    results: dict[tuple[str, int], dict | None] = {}
    last: dict[str, float | None] = {v: 0.0 for v in args.variants}
    for L in sorted(args.lengths):
        for v in args.variants:
            previous = last[v]
            if previous is None or previous * GROWTH[v] > args.limit:
                results[v, L], last[v] = None, None
                print(f"{v:8s} {L:5d}: skipped: >{args.limit:.0f} s (predicted)", flush=True)
                continue
            cell = results[v, L] = cell_in_subprocess(v, L, args)
            last[v] = cell.get("seconds")
            print(f"{v:8s} {L:5d}: {json.dumps(cell)}", flush=True)
    print()
    print_table(results, sorted(args.lengths), args.limit)
    eager = [L for L in sorted(args.lengths) if (EAGER, L) in results]
    if eager:
        print_eager_table(results, eager, args.limit)
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average "
          f"{os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
