"""Peak memory per process, DDP vs FSDP2, at 1 and 2 processes (the table in docs/scale.md).

    .venv/bin/python benchmarks/fsdp_memory.py                          # preset base, 3 steps
    .venv/bin/python benchmarks/fsdp_memory.py --preset small --steps 2

Each configuration is a real `motian pretrain` (MLM + sentence order, LAMB, fp32, CPU/gloo) of
the preset on the encoded demo corpus (runs/demo/encoded), started by torchrun, sequence length
64, global batch 4, micro-batch 2, an evaluation and final/ at the end, no checkpoints between.

Measured: each process's peak resident set size, `resource.getrusage(RUSAGE_SELF).ru_maxrss`,
read when `pretrain` returns; the table gives the largest over the ranks. RSS counts everything
the process holds: the Python and torch runtime (a few hundred MB before any model), the
objective as it is built (whole under ddp and on one process; several fsdp processes build it
on meta, `motian.train.meta_init`; the table in docs/scale.md predates that), batches,
activations, and pages malloc keeps after a free. It is not torch's allocator count
(benchmarks/plan_memory.py measures that, for one process); on a shared machine RSS moves by
some MB between identical runs.

    .venv/bin/python benchmarks/fsdp_memory.py --init --preset base     # initialisation only

`--init` measures only the start of an FSDP run on 2 processes: the objective built, sharded
(`fully_shard` per block and on the root) and, with meta-device initialisation, materialised
(`motian.train.meta_init`), once built whole as before and once on meta. Measured: the peak of
the bytes torch's CPU allocator holds on each rank over those steps (the profiler's memory
events, `plan_memory.allocated_peak`), not RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """\
model:
  preset: {preset}
  overrides: {{max_positions: 128}}
data: {{masking: motian, pair_task: sop}}
objective: {{kind: mlm, weighting: uncertainty}}
optim: {{name: lamb, lr: 0.001}}
stages:
  - {{fraction: 1.0, seq_len: 64, global_batch: 4, warmup: 0.1}}
steps: {steps}
eval: {{every: 0, seq_len: 64, rows: 16, batch: 8}}
checkpoint_every: 0
"""


def worker(args: argparse.Namespace) -> None:
    """One rank: pretrain, then print this process's peak RSS."""
    from motian.pretraining import pretrain
    from motian.train.settings import RunSettings

    out = Path(args.out)
    recipe = out.parent / f"{out.name}.yaml"
    if os.environ.get("RANK", "0") == "0":
        recipe.write_text(RECIPE.format(preset=args.preset, steps=args.steps), encoding="utf-8")
    else:  # rank 0 writes it; the others wait for the file
        while not recipe.is_file():
            time.sleep(0.05)
    run = RunSettings(device="cpu", threads=1, progress=False, micro_batch=2,
                      parallel=args.parallel)
    summary = pretrain(recipe=str(recipe), data=Path(args.data), out=out, run=run)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"RSS rank {summary['rank']} {peak_mb:.0f}", flush=True)


def init_peak(build, meta: bool, info) -> tuple[float, int, int]:
    """(peak bytes torch's CPU allocator holds on this rank while `build(meta)` builds a
    module, FSDP2 shards it over the process group and, built on meta, materialises it; the
    module's parameter bytes; its largest parameter's bytes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.plan_memory import allocated_peak
    from motian.train.distributed import wrap_model
    from motian.train.meta_init import materialise

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module = build(meta)
        wrap_model(module, info, "fsdp")
        materialise(module, torch.device("cpu"))
    sizes = [p.numel() * p.element_size() for p in module.parameters()]  # whole, not shards
    return allocated_peak(prof), sum(sizes), max(sizes)


def init_worker(args: argparse.Namespace) -> None:
    """One rank of `--init` (`--out` is the recipe file): the recipe's objective built whole,
    then on meta."""
    from motian.pretraining import build_objective
    from motian.train.distributed import process_group
    from motian.train.recipe import load_recipe
    from motian.train.settings import RunSettings

    recipe = load_recipe(args.out)
    run = RunSettings(device="cpu", threads=1, parallel="fsdp")
    with process_group("cpu") as info:
        for meta in (False, True):
            peak, total, largest = init_peak(
                lambda m: build_objective(recipe, Path(args.data), run, meta=m), meta, info)
            print(f"INIT rank {info.rank} meta {int(meta)} {peak / 2**20:.1f} "
                  f"{total / 2**20:.1f} {largest / 2**20:.1f}", flush=True)


def init_table(args: argparse.Namespace, torchrun: list[str], env: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "init.yaml"
        recipe.write_text(RECIPE.format(preset=args.preset, steps=args.steps), encoding="utf-8")
        done = subprocess.run([*torchrun, "--log-dir", str(Path(tmp) / "logs"), __file__,
                               "--worker", "--init", "--data", args.data, "--out", str(recipe)],
                              env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"--init failed:\n{done.stderr[-3000:]}")
    rows = sorted(line.split()[2:] for line in done.stdout.splitlines()
                  if line.startswith("INIT rank "))
    total, largest = rows[0][4], rows[0][5]
    print(f"preset {args.preset}: parameters {total} MiB fp32, the largest {largest} MiB; "
          "2 processes, FSDP2 per block and on the root\n")
    print("| initialisation | rank | peak allocated while building and sharding (MiB) |")
    print("|---|---|---|")
    for rank, _, meta, peak, _, _ in sorted(rows, key=lambda r: (r[2], r[0])):
        print(f"| {'on meta, materialised' if meta == '1' else 'whole, then sharded'} "
              f"| {rank} | {float(peak):,.1f} |")


def parameters(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", default="runs/demo/encoded")
    parser.add_argument("--init", action="store_true",
                        help="measure only the initialisation, whole vs on meta, 2 processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (init_worker if args.init else worker)(args)
        return
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if args.init:
        init_table(args, [torchrun, "--standalone", "--nproc_per_node", "2"], env)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for parallel in ("ddp", "fsdp"):
            for n in (1, 2):
                out = Path(tmp) / f"{parallel}-{n}"
                started = time.monotonic()
                done = subprocess.run(
                    [torchrun, "--standalone", "--nproc_per_node", str(n), "--log-dir",
                     str(Path(tmp) / "logs" / out.name), __file__, "--worker", "--preset",
                     args.preset, "--steps", str(args.steps), "--data", args.data,
                     "--parallel", parallel, "--out", str(out)],
                    env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{parallel} x {n} failed:\n{done.stderr[-3000:]}")
                rss = sorted(float(line.split()[-1]) for line in done.stdout.splitlines()
                             if line.startswith("RSS rank "))
                rows.append((parallel, n, rss, time.monotonic() - started))
                n_params = parameters(out / "final")
    print(f"preset {args.preset}: {n_params:,} parameters ({n_params * 4 / 2**20:,.0f} MB "
          f"fp32); {args.steps} LAMB steps, seq 64, global batch 4, micro-batch 2\n")
    print("| parallel | processes | peak RSS per process (MB, max over ranks) | each rank "
          "| wall s |")
    print("|---|---|---|---|---|")
    for parallel, n, rss, wall in rows:
        print(f"| {parallel} | {n} | {max(rss):,.0f} | {', '.join(f'{r:,.0f}' for r in rss)} "
              f"| {wall:.0f} |")


if __name__ == "__main__":
    main()
