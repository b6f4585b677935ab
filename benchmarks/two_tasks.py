"""MLM alone vs MLM + the click task in the same steps, and how the two losses are weighted.

    python benchmarks/two_tasks.py pretrain --data runs/demo/encoded --steps 1000 \
        --seeds 1 2 3 --out runs/two_tasks
    python benchmarks/two_tasks.py downstream --out runs/two_tasks --arms mlm click-bounded \
        --seeds 1 2 3
    python benchmarks/two_tasks.py table --out runs/two_tasks

Every arm is the `motian-demo` recipe (demo model, Motian masking, 32 rows per step) with one
change, trained for the same number of optimizer steps (a step costs the same in every arm:
pair rows replace corpus rows one for one, same length), with each pretraining seed setting
both the model initialisation and the data order:

- ``mlm``: no pair task (every row a corpus row);
- ``click-fixed``: a quarter of each batch click pairs, losses summed with weight 1 each;
- ``click-uncertainty``: learned uncertainty weighting (Kendall et al. 2018), unbounded;
- ``click-bounded``: the same, each weight kept in [0.5, 2] (the recipe's default);
- ``click-warmup``: unbounded, but the weights learn only after the first half of the run.

Reported per arm (mean ± std over seeds): the common held-out MLM evaluation, the pair accuracy
on the held-out articles' click pairs, the final task weights, and the seconds of training.
`downstream` fine-tunes each arm's final model (and a random initialisation) on pd98-headline
(headline <-> paragraph on held-out articles), reviews-sentiment and pd98-ner, one fine-tuning
run per pretraining seed (fine-tuning seed = pretraining seed). Runs are plain `motian
pretrain` / `motian finetune` processes, two at a time with one thread each; a run whose result
exists is skipped, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation import run_parallel  # noqa: E402
from benchmarks.pretrain import with_settings  # noqa: E402
from motian.tasks.metrics import mean_std  # noqa: E402
from motian.train.metrics import read_metrics  # noqa: E402
from motian.train.recipe import save_recipe  # noqa: E402

ARMS = {
    "mlm": ["data.pair_task=none"],
    "click-fixed": ["objective.weighting=fixed"],
    "click-uncertainty": ["objective.weight_bounds=null"],
    "click-bounded": [],
    "click-warmup": ["objective.weight_bounds=null", "objective.weight_warmup=0.5"],
}
TASKS = {"pd98-headline": "accuracy", "reviews-sentiment": "accuracy", "pd98-ner": "f1"}


def run_pool(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    """Run (command, log file) jobs `parallel` at a time, one thread each (the ablation's
    runner); stop when one failed."""
    if any(run_parallel(jobs, parallel)):
        raise SystemExit("a run failed: see its log above")


def pretrain(args) -> None:
    jobs = []
    for seed in args.seeds:  # seed-major: a partial run has every arm at the first seeds
        for arm in args.arms:
            run = args.out / f"{arm}-s{seed}"
            if (run / "final").is_dir():
                continue
            recipe = with_settings(args.recipe, [*ARMS[arm], f"seed={seed}", f"data.seed={seed}",
                                                 "budget_minutes=0", f"steps={args.steps}",
                                                 f"eval.every={args.steps // 4}",
                                                 f"checkpoint_every={args.steps // 2}"])
            run.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{arm}-s{seed}.yaml"
            save_recipe(recipe, path)
            resume = ["--resume"] if (run / "checkpoints").is_dir() else []
            jobs.append(([sys.executable, "-m", "motian.cli", "pretrain", "--recipe", str(path),
                          "--data", str(args.data), "--out", str(run), "--device", "cpu",
                          "--threads", "1", "--no-progress", *resume], run.with_suffix(".log")))
    run_pool(jobs, args.parallel)


def finetune_jobs(args) -> list[tuple[list[str], Path]]:
    jobs = []
    for arm in [*args.arms, "random"]:
        for seed in args.seeds:
            init = args.out / f"{args.arms[0] if arm == 'random' else arm}-s{seed}" / "final"
            for task in args.tasks:
                out = args.out / "finetune" / f"{arm}-s{seed}" / task
                if (out / "results.json").is_file():
                    continue
                random = ["--random-init"] if arm == "random" else []
                jobs.append(([sys.executable, "-m", "motian.cli", "finetune", "--task", task,
                              "--model", str(init), *random, "--out", str(out), "--seeds",
                              str(seed), "--max-train", str(args.max_train), "--epochs",
                              str(args.epochs), "--lr", str(args.lr), "--pooling",
                              args.pooling, "--device", "cpu", "--threads", "1",
                              "--no-progress"], out.with_suffix(".log")))
    return jobs


def downstream(args) -> None:
    run_pool(finetune_jobs(args), args.parallel)


def _pretrain_row(run: Path) -> dict | None:
    if not (run / "final").is_dir():
        return None
    evals = read_metrics(run / "metrics.jsonl", "eval")
    train = read_metrics(run / "metrics.jsonl", "train")
    last, first = evals[-1], evals[0]
    seconds = train[-1].get("elapsed_s")
    return {"accuracy": 100 * last["accuracy"], "loss": last["loss"],
            "pair_accuracy": 100 * last["pair_accuracy"] if "pair_accuracy" in last else None,
            "pair_majority": 100 * first.get("pair_majority", math.nan),
            "weight_mlm": train[-1].get("weight_mlm"), "weight_pair": train[-1].get("weight_pair"),
            "seconds": seconds}


def _fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _main_metric(results: Path, metric: str) -> float | None:
    if not results.is_file():
        return None
    runs = json.loads(results.read_text())["runs"]
    value = runs[0].get("test", {}).get(metric)
    return None if value is None else 100 * value


def table(args) -> None:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}; {args.steps} steps per run, seeds "
             f"{' '.join(map(str, args.seeds))}.", "",
             "| arm | held-out MLM acc % | held-out MLM loss | held-out pair acc % | "
             "weight mlm / pair | s per run |", "|---|---|---|---|---|---|"]
    for arm in args.arms:
        rows = [r for s in args.seeds if (r := _pretrain_row(args.out / f"{arm}-s{s}"))]
        if not rows:
            continue
        weights = (f"{_fmt([r['weight_mlm'] for r in rows])} / "
                   f"{_fmt([r['weight_pair'] for r in rows])}")
        lines.append(f"| {arm} (n={len(rows)}) | {_fmt([r['accuracy'] for r in rows])} | "
                     f"{_fmt([r['loss'] for r in rows], 3)} | "
                     f"{_fmt([r['pair_accuracy'] for r in rows], 1)} | {weights} | "
                     f"{_fmt([r['seconds'] for r in rows], 0)} |")
    ft = args.out / "finetune"
    if ft.is_dir():
        lines += ["", "| init | " + " | ".join(f"{t} test {m}" for t, m in TASKS.items()) + " |",
                  "|---|" + "---|" * len(TASKS)]
        for arm in ["random", *args.arms]:
            cells = [_fmt([_main_metric(ft / f"{arm}-s{s}" / t / "results.json", m)
                           for s in args.seeds]) for t, m in TASKS.items()]
            if any(c != "—" for c in cells):
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["pretrain", "downstream", "table"])
    p.add_argument("--data", type=Path, default=Path("runs/demo/encoded"))
    p.add_argument("--recipe", default="motian-demo")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--max-train", type=int, default=3000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pooling", choices=["cls", "mean"], default="mean")
    p.add_argument("--out", type=Path, default=Path("runs/two_tasks"))
    args = p.parse_args()
    {"pretrain": pretrain, "downstream": downstream, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
