"""FastBERT early exit on reviews-sentiment: does the default threshold halve the mean number
of blocks run within 1 point of the full model's accuracy, and what does it save in time?

    .venv/bin/python benchmarks/early_exit.py                       # 4 blocks from runs/demo
    .venv/bin/python benchmarks/early_exit.py --layers 6 --out runs/early-exit-6

1. The model: the demo's pretrained 2-block encoder (`make demo`: runs/demo/pretrain/final)
   stacked to `--layers` blocks (progressive stacking, motian/model/stacking.py: block 2 + i
   starts as a copy of block i), so early exit has blocks to skip; `--start` takes another
   checkpoint (not stacked when it already has `--layers` blocks or more).
2. `motian finetune --task reviews-sentiment` (one seed), as usual.
3. `motian early-exit`: students trained by self-distillation with the rest frozen, the
   threshold chosen on dev (fewest blocks within 1 point), the test curve at batch
   `--batch-size` (wall time: fastest of `--repeats` passes, thresholds taken in turn).
4. The same test curve at batch 1 (`motian early-exit-curve`) for the full model and the
   default threshold: where a request is alone, exiting stops the whole forward.

Everything lands in `--out` (result.json with both curves); the tables are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from motian.early_exiting import curve_table, early_exit, early_exit_curve
from motian.finetuning import finetune
from motian.model import save_pretrained
from motian.model.artifact import copy_tokenizer, find_tokenizer
from motian.model.io import from_pretrained
from motian.model.stacking import depth, grow
from motian.task_training import TaskTraining
from motian.train.settings import RunSettings


def stacked_start(start: Path, layers: int, root: Path) -> Path:
    """`start` grown to `layers` blocks by stacking, saved with its tokenizer."""
    model = from_pretrained(start)
    if depth(model) >= layers:
        return start
    grow(model, layers)
    directory = save_pretrained(model, root / f"start-{layers}-layers")
    copy_tokenizer(find_tokenizer(start), directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=Path, default=Path("runs/demo/pretrain/final"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/early-exit"))
    parser.add_argument("--max-train", type=int, default=6000)
    parser.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs")
    parser.add_argument("--exit-epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="of the timed curve")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS",
                                                                          "0") or 0))
    args = parser.parse_args()
    if not (args.start / "config.json").is_file():
        raise SystemExit(f"{args.start}: no model; run `make demo` first or give --start")
    args.out.mkdir(parents=True, exist_ok=True)
    run = RunSettings(device="cpu", threads=args.threads, progress=False)
    t0 = time.perf_counter()
    start = stacked_start(args.start, args.layers, args.out)
    tuned = finetune("reviews-sentiment", args.out / "finetune", model=start, seeds=[1],
                     max_train=args.max_train, training=TaskTraining(epochs=args.epochs),
                     run=run)
    t_finetune = time.perf_counter() - t0
    model = args.out / "finetune" / "seed-1" / "model"
    result = early_exit(model, args.out / "model", max_train=args.max_train,
                        epochs=args.exit_epochs, eval_batch_size=args.batch_size,
                        repeats=args.repeats, run=run)
    single = early_exit_curve(args.out / "model", thresholds=[0.0], batch_size=1,
                              repeats=args.repeats, threads=args.threads)
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                          f"{args.threads or 'default'}",
               "start": str(start), "layers": args.layers,
               "finetune": tuned["summary"], "finetune_seconds": round(t_finetune, 1),
               "early_exit": result, "batch_1": single,
               "total_seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n",
                                          encoding="utf-8")
    print(f"\n{args.layers}-block model, reviews-sentiment test; threshold "
          f"{result['threshold']:g} ({result['threshold_why']})")
    print(f"\nbatch {args.batch_size}:\n" + curve_table(result["test"], result["threshold"]))
    print("\nbatch 1:\n" + curve_table(single["rows"], single["threshold"]))
    print(f"\ntotal {summary['total_seconds']} s on {summary['machine']}")


if __name__ == "__main__":
    main()
