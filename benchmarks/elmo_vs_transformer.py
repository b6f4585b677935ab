"""ELMo (feature-based) against the Transformer (fine-tuned) at equal pretraining minutes.

    python benchmarks/elmo_vs_transformer.py --data runs/demo/encoded --minutes 3 --clock cpu \
        --seeds 1 2 3 --out runs/elmo_vs_transformer --reference runs/objectives

The Transformer arm is the MLM arm of `benchmarks/objectives.py` (the `demo` recipe), already
pretrained and fine-tuned under --reference (read only; nothing there is run or changed). This
script pretrains the `elmo-demo` recipe with the same seeds, on the same shards, for the same
CPU minutes (`budget_clock: cpu`, one thread per process), then uses each biLM feature-based
(`motian finetune --model RUN/final`: the biLM frozen, a learned scalar mix of its layers and a
linear tagger / mean pooling + linear classifier, docs/knowledge.md "ELMo") on
`reviews-sentiment` and `pd98-ner` with the reference's training cap, test split and
fine-tuning seeds (100 N + 1 for pretraining seed N). The learning rate is --ft-lr (the frozen
biLM leaves only a small task model to train, which takes a larger rate than a whole
Transformer's 1e-3). A reference made with other minutes, clock, data or caps is refused.

Runs are ordinary `motian pretrain` / `motian finetune` runs under --out/elmo/seed<N>/,
--together at a time; finished ones are skipped and an interrupted pretraining resumes, so
re-running the command continues.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation import run_parallel  # noqa: E402
from benchmarks.objectives import (  # noqa: E402
    ARMS,
    SUITES,
    Arm,
    _pm,
    _vs_reference,
    check_settings,
    collect_run,
    finetune_job,
    ft_seeds,
    pretrain_job,
    run_dir,
    settings_key,
)

ELMO = Arm("ELMo (feature-based)", "elmo", "elmo-demo")
MLM = ARMS[0]
TASKS = SUITES["encoders"].tasks


def reference_args(args: argparse.Namespace) -> argparse.Namespace:
    """The objectives run's settings, refused unless they are this run's."""
    ref = argparse.Namespace(**{**vars(args), "out": args.reference})
    path = args.reference / "settings.json"
    if not path.is_file():
        sys.exit(f"{path}: no objectives run there; run benchmarks/objectives.py --arms mlm "
                 f"--out {args.reference} first")
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved != settings_key(args):
        sys.exit(f"{path}: the reference was made with {saved}, this run asks for "
                 f"{settings_key(args)}; give the same --minutes, --clock, --data and caps")
    return ref


def run_all(args: argparse.Namespace) -> None:
    todo = [s for s in args.seeds
            if not (run_dir(args, ELMO, s) / "pretrain" / "summary.json").is_file()]
    print(f"[pretrain] elmo seeds {todo}: {args.minutes:g} {args.clock} min each", flush=True)
    run_parallel([pretrain_job(args, ELMO, s) for s in todo], args.together)
    jobs = []
    for seed in args.seeds:
        d = run_dir(args, ELMO, seed)
        if not (d / "pretrain" / "summary.json").is_file():
            continue
        for task in TASKS:
            if not (d / task / "results.json").is_file():
                cmd, log = finetune_job(args, d / "pretrain" / "final", d / task, task,
                                        ft_seeds(args, seed))
                jobs.append(([*cmd, "--threads", "1", "--lr", str(args.ft_lr)], log))
    print(f"[downstream] {len(jobs)} fine-tuning runs, {args.together} at a time", flush=True)
    run_parallel(jobs, args.together)


def random_init(ref: argparse.Namespace) -> dict[str, list[float]]:
    out = {}
    for task, metric in TASKS.items():
        path = ref.out / "random-init" / task / "results.json"
        if path.is_file():
            done = json.loads(path.read_text(encoding="utf-8"))
            out[task] = [r["test"][metric] for r in done["runs"] if "test" in r]
    return out


def markdown(args: argparse.Namespace, ref: argparse.Namespace) -> str:
    import torch

    arms = [(MLM, ref, "fine-tuned, `motian finetune` defaults (lr 1e-3)"),
            (ELMO, args, f"frozen biLM + scalar mix + linear, lr {args.ft_lr:g}")]
    runs = {a.slug: [r for s in args.seeds if (r := collect_run(o, a, s)) is not None]
            for a, o, _ in arms}
    ref_down = {t: [v for r in runs[MLM.slug] for v in r["downstream"][t]] for t in TASKS}
    lines = [f"### ELMo vs Transformer at equal cost: {args.minutes:g} {args.clock}-clock "
             f"minutes of pretraining each ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, fp32, 1 thread per process, {args.together} run(s) at a "
             "time, other jobs sharing the machine (the cpu clock keeps each pretraining's work "
             f"equal). Pretraining seeds {', '.join(map(str, args.seeds))}, one fine-tuning seed each (100 N + 1), "
             f"at most {args.ft_max_train} training examples, 3 epochs, the whole test splits. "
             "Cells: mean ± std over the seeds.", "",
             "| arm | how used | runs | steps | held-out loss (own) | reviews-sentiment test "
             "accuracy % | vs MLM | pd98-ner test F1 % | vs MLM |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for arm, _, how in arms:
        rs = runs[arm.slug]
        cells = [arm.name, how, str(len(rs)), _pm([r["steps"] for r in rs], 1.0, 0),
                 _pm([r["eval"]["loss"] for r in rs], 1.0, 3)]
        for t in TASKS:
            values = [v for r in rs for v in r["downstream"][t]]
            cells += [_pm(values), "ref." if arm is MLM else _vs_reference(ref_down[t], values)]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["random initialisation (Transformer)", "fine-tuned", "—", "—", "—"]
    for t, values in ((t, random_init(ref).get(t, [])) for t in TASKS):
        cells += [_pm(values), _vs_reference(ref_down[t], values)]
    lines += ["| " + " | ".join(cells) + " |", "",
              "Held-out loss (own): the MLM arm's masked-token loss; ELMo's forward and backward "
              "next-token loss (not comparable). \"vs MLM\": arm − MLM in points, better/worse "
              "only beyond √(std₁² + std₂²) (docs/objectives.md's rule).", ""]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/demo/encoded"))
    p.add_argument("--out", type=Path, default=Path("runs/elmo_vs_transformer"))
    p.add_argument("--reference", type=Path, default=Path("runs/objectives"),
                   help="the objectives run whose MLM arm is the Transformer (read only)")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining budget per run")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ft-max-train", type=int, default=6000)
    p.add_argument("--ft-max-eval", type=int, default=0, help="0 = the whole test split")
    p.add_argument("--ft-lr", type=float, default=0.01, help="ELMo's task-model learning rate")
    p.add_argument("--together", type=int, default=2, help="runs at a time")
    p.add_argument("--table-only", action="store_true", help="collect and print, run nothing")
    args = p.parse_args()
    args.suite, args.ft_seeds = "encoders", 1  # objectives.py's job builders read them
    args.data = args.data.resolve()  # as the reference's settings.json records it
    return args


def main() -> int:
    args = parse_args()
    ref = reference_args(args)
    check_settings(args)
    if not args.table_only:
        run_all(args)
    table = markdown(args, ref)
    print(table)
    (args.out / "elmo_vs_transformer.md").write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
