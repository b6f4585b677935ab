"""Held-out perplexity on long People's Daily text at equal CPU minutes (issue 19):

    python benchmarks/long_ppl.py --data runs/long/pd98/encoded --minutes 1.25 \
        --seeds 1 2 3 --out runs/long --report docs/long.md

The data is `motian long-data`'s corpus (docs/long.md): People's Daily 1998 without the bundled
tasks' dev articles; every recipe here sets `eval.holdout_every: 9`, so the held-out split is
exactly the pd98 test articles. Three comparisons, two arms each, every arm pretrained with each
seed (model initialisation and data order) for --minutes of its own CPU time (recipe
`budget_clock: cpu`, one thread, `nice -n 5`), then evaluated once at the end:

- **memory** (`xl-demo`, segments of 128): Transformer-XL with a memory of 128, evaluated on
  the held-out stream with the memory carried and with no memory (the same model), beside the
  same model trained with `objective.memory: 0` (no recurrence in training or evaluation).
  Next-token perplexity.
- **window** (`longformer-demo`, rows of 1,024): sliding window, 128 tokens per side with a
  global [CLS], against full attention (`attention: full`), same shape, data and steps'
  tokens. Masked-token loss on held-out rows of 1,024 (BERT masking at 15%, fixed seed);
  exp(loss) is the masked-token (pseudo-)perplexity.
- **stages** (`demo` shape, ALiBi): the two-stage schedule (80% of the minutes at 128 tokens,
  32 rows; 20% at 512, 8 rows: the same 4,096 tokens per step) against 128 tokens all along,
  both evaluated on held-out rows of 512 tokens (masked-token loss as above).

Each run is an ordinary `motian pretrain` under --out/<arm>/seed<N>/ with its log beside it: a
finished run (summary.json) is skipped and an interrupted one resumes, so re-running the command
continues. A cached run made with other settings is refused (settings.json).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation import run_parallel, update_report  # noqa: E402
from benchmarks.pretrain import with_settings  # noqa: E402
from motian.io import write_json_atomic  # noqa: E402
from motian.tasks.metrics import mean_std  # noqa: E402
from motian.train.lock import LOCK  # noqa: E402
from motian.train.recipe import save_recipe  # noqa: E402

COMMON = ("eval.holdout_every=9", "eval.every=0", "checkpoint_every=30s")
TWO_STAGES = ("stages=[{name: short, fraction: 0.8, seq_len: 128, global_batch: 32, "
              "warmup: 0.05}, {name: long, fraction: 0.2, seq_len: 512, global_batch: 8, "
              "warmup: 0.1}]")
SHORT_ONLY = "stages=[{name: short, fraction: 1.0, seq_len: 128, global_batch: 32, warmup: 0.05}]"
AT_512 = ("eval.seq_len=512", "eval.rows=64", "eval.batch=8", "model.overrides.max_positions=512")


@dataclass(frozen=True)
class Arm:
    comparison: str
    slug: str
    name: str
    recipe: str
    sets: tuple[str, ...] = ()


ARMS = (
    Arm("memory", "xl-memory", "Transformer-XL, memory 128", "xl-demo",
        ("eval.rows=512", "eval.batch=8")),
    Arm("memory", "xl-no-memory", "trained without memory", "xl-demo",
        ("objective.memory=0", "eval.rows=512", "eval.batch=8")),
    Arm("window", "sliding-1024", "sliding window w=128 + global [CLS]", "longformer-demo"),
    Arm("window", "full-1024", "full attention", "longformer-demo",
        ("model.overrides.attention=full",)),
    Arm("stages", "two-stage", "128 -> 512 (80% / 20% of the minutes)", "demo",
        (TWO_STAGES, *AT_512)),
    Arm("stages", "short-only", "128 only", "demo", (SHORT_ONLY, *AT_512)),
)


def run_dir(args: argparse.Namespace, arm: Arm, seed: int) -> Path:
    return args.out / arm.slug / f"seed{seed}"


def check_settings(args: argparse.Namespace) -> None:
    key = {"minutes": args.minutes, "data": str(args.data)}
    path = args.out / "settings.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != key:
        sys.exit(f"{path}: these runs were made with other settings than {key}; use another "
                 "--out, or delete that directory to redo them")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, key)


def pretrain_job(args: argparse.Namespace, arm: Arm, seed: int) -> tuple[list[str], Path]:
    d = run_dir(args, arm, seed)
    d.mkdir(parents=True, exist_ok=True)
    recipe = with_settings(arm.recipe, [*COMMON, *arm.sets, f"seed={seed}", f"data.seed={seed}"])
    save_recipe(replace(recipe, budget_minutes=args.minutes, budget_clock="cpu"),
                d / "recipe.yaml")
    cmd = ["nice", "-n", "5", sys.executable, "-m", "motian.cli", "pretrain", "--recipe",
           str(d / "recipe.yaml"), "--data", str(args.data), "--out", str(d / "pretrain"),
           "--resume", "--device", "cpu", "--threads", "1", "--no-progress"]
    return cmd, d / "pretrain.log"


def done(args: argparse.Namespace, arm: Arm, seed: int) -> bool:
    return (run_dir(args, arm, seed) / "pretrain" / "summary.json").is_file()


def in_use(args: argparse.Namespace, arm: Arm, seed: int) -> bool:
    """Another driver's run holds this run directory (motian.train.lock) right now."""
    path = run_dir(args, arm, seed) / "pretrain" / LOCK
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def run_all(args: argparse.Namespace, arms: list[Arm]) -> None:
    """Seed by seed, the two arms of a comparison side by side (the same contention). Runs
    finished or in use by another driver when their wave comes are skipped, so several
    drivers (e.g. one per comparison) can share --out."""
    todo = [(arm, seed) for seed in args.seeds for arm in arms]
    print(f"{sum(not done(args, a, s) for a, s in todo)} runs to do, {args.together} at a "
          f"time, {args.minutes:g} CPU minutes each (load average {os.getloadavg()[0]:.2f})",
          flush=True)
    for i in range(0, len(todo), args.together):
        wave = [(a, s) for a, s in todo[i:i + args.together]
                if not done(args, a, s) and not in_use(args, a, s)]
        run_parallel([pretrain_job(args, a, s) for a, s in wave], args.together)


def collect(args: argparse.Namespace, arm: Arm) -> list[dict]:
    runs = []
    for seed in args.seeds:
        path = run_dir(args, arm, seed) / "pretrain" / "summary.json"
        if path.is_file():
            s = json.loads(path.read_text(encoding="utf-8"))
            runs.append({"seed": seed, "steps": s["steps"], "tokens": s["tokens_seen"],
                         "cpu_s": s["seconds"], **s["eval"]})
    return runs


def _pm(values: list[float], digits: int = 1) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _perplexity(run: dict) -> float:
    return run.get("perplexity", math.exp(min(run["loss"], 50.0)))


def markdown(args: argparse.Namespace, arms: list[Arm]) -> str:
    lines = [f"{args.minutes:g} CPU minutes per run (`budget_clock: cpu`, 1 thread, nice 5), "
             f"seeds {' '.join(map(str, args.seeds))}; mean ± sample std over the seeds that "
             "finished (n).", "",
             "| comparison | arm | evaluated | n | steps | held-out loss | perplexity | "
             "per seed (perplexity) |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        runs = collect(args, arm)
        rows = [("as trained", runs, [r["loss"] for r in runs], [_perplexity(r) for r in runs])]
        if arm.slug == "xl-memory":
            rows = [("memory carried", *rows[0][1:]),
                    ("no memory (same model)", runs, [r["loss_no_memory"] for r in runs],
                     [r["perplexity_no_memory"] for r in runs])]
        for label, rs, losses, ppl in rows:
            lines.append(f"| {arm.comparison} | {arm.name} | {label} | {len(rs)} | "
                         f"{_pm([r['steps'] for r in rs], 0)} | {_pm(losses, 3)} | {_pm(ppl)} | "
                         f"{', '.join(f'{p:.1f}' for p in ppl)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/long/pd98/encoded"))
    p.add_argument("--minutes", type=float, default=1.25, help="CPU minutes per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--comparisons", nargs="+", default=["memory", "window", "stages"],
                   choices=["memory", "window", "stages"])
    p.add_argument("--together", type=int, default=2, help="runs at the same time")
    p.add_argument("--out", type=Path, default=Path("runs/long"))
    p.add_argument("--report", type=Path, help="write the table into this Markdown file")
    p.add_argument("--table-only", action="store_true", help="collect finished runs only")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    arms = [a for a in ARMS if a.comparison in args.comparisons]
    check_settings(args)
    if not args.table_only:
        run_all(args, arms)
    table = markdown(args, arms)
    print(table)
    if args.report:
        update_report(args.report, table, marker="long-ppl-results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
