"""MT-DNN against single-task fine-tuning (docs/finetune.md, "Multi-task fine-tuning (MT-DNN)"):
from one pretrained checkpoint, each bundled task fine-tuned alone (`motian finetune`), all of
them together with one shared encoder (`motian multitask`), and the multi-task models then
fine-tuned on each task alone (`--then-single`); same seeds, samples and settings. Prints a
Markdown table of test (and dev) scores, mean ± std over the seeds.

    python benchmarks/multitask.py --model runs/demo/pretrain/final --seeds 1 2 3 \
        --max-train 1000 --max-eval 500 --epochs 2 --out runs/multitask
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.finetuning import finetune  # noqa: E402
from motian.multitasking import multitask  # noqa: E402
from motian.reporting.tables import fmt  # noqa: E402
from motian.task_training import TaskTraining  # noqa: E402
from motian.train.settings import RunSettings  # noqa: E402

TASKS = ["reviews-sentiment", "pd98-ner", "pd98-seg"]
METRIC = {"reviews-sentiment": "accuracy", "pd98-ner": "f1", "pd98-seg": "f1"}


def cell(summary: dict, split: str, metric: str) -> str:
    mean, std, _ = summary[split][metric]
    return fmt(mean, std)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/demo/pretrain/final"))
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=500)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--sampling", default="proportional")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/multitask"))
    args = p.parse_args()
    common = dict(model=args.model, seeds=args.seeds, max_train=args.max_train,
                  max_eval=args.max_eval,
                  training=TaskTraining(epochs=args.epochs, batch_size=32),
                  run=RunSettings(device="cpu", threads=args.threads, progress=False))
    t0 = time.perf_counter()
    single = {task: finetune(task, args.out / "single" / task, save_model=False,
                             **common)["summary"] for task in args.tasks}
    t_single = time.perf_counter() - t0
    mt = multitask(args.tasks, args.out / "mt", then_single=True, sampling=args.sampling,
                   **common)
    t_mt = time.perf_counter() - t0 - t_single
    print(f"\nsingle-task runs {t_single:.0f} s; multi-task runs + then-single {t_mt:.0f} s\n")
    print("| task | split | metric | single-task | MT-DNN | MT-DNN, then single-task |")
    print("|---|---|---|---:|---:|---:|")
    for split in ("test", "dev"):
        for task in args.tasks:
            metric = METRIC.get(task, "accuracy")
            print(f"| {task} | {split} | {metric} | {cell(single[task], split, metric)} | "
                  f"{cell(mt['tasks'][task]['summary'], split, metric)} | "
                  f"{cell(mt['then_single'][task]['summary'], split, metric)} |")


if __name__ == "__main__":
    main()
