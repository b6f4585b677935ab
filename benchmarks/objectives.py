"""Pretraining objectives against each other at equal cost: which buys the most model per
CPU-minute on the bundled corpus?

    python benchmarks/objectives.py --data runs/demo/encoded --minutes 3 --clock cpu \
        --seeds 1 2 3 --out runs/objectives --report docs/objectives.md
    python benchmarks/objectives.py --suite generators --data runs/demo/encoded --minutes 3 \
        --clock cpu --seeds 1 2 3 --out runs/generators --report docs/generate.md

Suite "encoders" (the default) compares the efficient objectives with MLM; suite "generators"
compares the generating families (GPT, UNILM, MASS) on `pd98-headline-gen` (test ROUGE-L,
fine-tuned with the options docs/generate.md used), beside random initialisation and the lead
baseline.

Arms are the bundled recipes, unchanged but for their length, clock and seed: `demo` (MLM, the
reference), `electra-demo`, `mc-bert-demo`, `spanbert-demo` (span masking + SBO),
`notes-demo` (Taking Notes on the Fly), `stacking-demo` (1 block, then 2) and `ernie2-demo`
(ERNIE 2.0's continual multi-task schedule; words and phrases masked, the demo shards having no
entity marks: docs/knowledge.md). Every arm is
pretrained with each seed for the same budget, then fine-tuned on `reviews-sentiment` (test
accuracy) and `pd98-ner` (test entity F1) with `motian finetune`'s defaults for the model and
--ft-max-train examples; each pretrained model is fine-tuned with --ft-seeds seeds. Beside them:
random initialisation (the MLM arm's shape, --random-init, the same fine-tuning seeds) and a
character 1-2-gram TF-IDF + logistic regression baseline on the same training reviews.

Equal cost on a shared machine. `--clock cpu` keys each run's budget to its own CPU seconds
(recipe `budget_clock: cpu`), one thread per process: a run slowed by other jobs gets the same
work, not fewer steps. Runs go two at a time; the waves pair different arms, rotated per seed.

For stacking and notes, the papers claim the MLM model's quality in fewer steps (about 25% and up
to 60%): the table gives, per seed, the share of the budget each needed to reach the MLM arm's
final held-out MLM loss (mean over its seeds), interpolated between evaluations (every 10%).

Each run is an ordinary `motian pretrain` / `motian finetune` under --out/<arm>/seed<N>/ with its
log beside it; finished steps are skipped and an interrupted pretraining resumes, so re-running
the command continues. A cached run made with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation import run_parallel, update_report, verdict  # noqa: E402
from benchmarks.downstream import tfidf_accuracy  # noqa: E402
from benchmarks.pretrain import with_settings  # noqa: E402
from motian.data.shards import write_json_atomic  # noqa: E402
from motian.tasks.metrics import mean_std  # noqa: E402
from motian.train.recipe import save_recipe  # noqa: E402


@dataclass(frozen=True)
class Arm:
    name: str
    slug: str
    recipe: str
    overrides: tuple[str, ...] = ()  # recipe fields changed (`motian pretrain --override`)


ARMS = (
    Arm("MLM (demo recipe)", "mlm", "demo"),
    Arm("ELECTRA", "electra", "electra-demo"),
    Arm("MC-BERT", "mc-bert", "mc-bert-demo"),
    Arm("SpanBERT (span masking + SBO)", "spanbert", "spanbert-demo"),
    Arm("Taking Notes on the Fly", "notes", "notes-demo"),
    Arm("Progressive stacking", "stacking", "stacking-demo"),
    # The demo shards carry no entity marks: knowledge masking without its entity level
    # (words and phrases, whole), docs/knowledge.md "ERNIE 2.0: continual multi-task pretraining"
    Arm("ERNIE 2.0 schedule", "ernie2", "ernie2-demo",
        ("data.masking_overrides={entity_prob: 0}",)),
)
GENERATOR_ARMS = (
    Arm("GPT (causal LM)", "gpt", "gpt-demo"),
    Arm("UNILM", "unilm", "unilm-demo"),
    Arm("MASS", "mass", "mass-demo"),
)


@dataclass(frozen=True)
class Suite:
    arms: tuple[Arm, ...]
    tasks: dict[str, str]  # task -> its main test metric
    reference: str  # the arm the others are compared with
    ft_options: tuple[str, ...] = ()  # `motian finetune` options beyond the defaults
    time_to_target: tuple[str, ...] = ()  # arms whose papers claim a faster way to its loss
    own_eval: tuple[str, ...] = ()  # arms whose held-out numbers are not the reference's kind


SUITES = {
    "encoders": Suite(ARMS, {"reviews-sentiment": "accuracy", "pd98-ner": "f1"}, "mlm",
                      time_to_target=("notes", "stacking"), own_eval=("electra", "mc-bert")),
    # docs/generate.md's headline options: 209 training articles need several epochs
    "generators": Suite(GENERATOR_ARMS, {"pd98-headline-gen": "rouge_l"}, "gpt",
                        ("--epochs", "8", "--batch-size", "16", "--lr", "2e-3", "--max-length",
                         "128"), own_eval=("unilm", "mass")),
}


def run_dir(args: argparse.Namespace, arm: Arm, seed: int) -> Path:
    return args.out / arm.slug / f"seed{seed}"


def settings_key(args: argparse.Namespace) -> dict:
    """What every result depends on: a cached run with other settings is refused."""
    return {"minutes": args.minutes, "clock": args.clock, "data": str(args.data),
            "ft_max_train": args.ft_max_train, "ft_max_eval": args.ft_max_eval,
            "ft_seeds": args.ft_seeds}


def check_settings(args: argparse.Namespace) -> None:
    path = args.out / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != settings_key(args):
            sys.exit(f"{path}: these runs were made with {saved}, not {settings_key(args)}; use "
                     "another --out, or delete that directory to redo them")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings_key(args))


# --------------------------------------------------------------------------- jobs


def pretrain_job(args: argparse.Namespace, arm: Arm, seed: int) -> tuple[list[str], Path]:
    d = run_dir(args, arm, seed)
    d.mkdir(parents=True, exist_ok=True)
    recipe = replace(with_settings(arm.recipe, [*arm.overrides, f"seed={seed}"]),
                     budget_minutes=args.minutes, budget_clock=args.clock)
    save_recipe(recipe, d / "recipe.yaml")
    cmd = [sys.executable, "-m", "motian.cli", "pretrain", "--recipe", str(d / "recipe.yaml"),
           "--data", str(args.data), "--out", str(d / "pretrain"), "--resume", "--device",
           "cpu", "--threads", "1", "--no-progress"]
    return cmd, d / "pretrain.log"


def finetune_job(args: argparse.Namespace, model: Path, out: Path, task: str,
                 seeds: list[int], random_init: bool = False) -> tuple[list[str], Path]:
    cmd = [sys.executable, "-m", "motian.cli", "finetune", "--task", task, "--out", str(out),
           "--model", str(model), "--seeds", *map(str, seeds), "--max-train",
           str(args.ft_max_train), "--no-save-model", "--device", "cpu", "--no-progress",
           *SUITES[args.suite].ft_options]
    if args.ft_max_eval:
        cmd += ["--max-eval", str(args.ft_max_eval)]
    if random_init:
        cmd.append("--random-init")
    return cmd, out.with_suffix(".log")


def ft_seeds(args: argparse.Namespace, seed: int) -> list[int]:
    """Fine-tuning seeds of the model pretrained with `seed`: distinct across pretraining seeds,
    so every downstream score of an arm has its own pretraining and fine-tuning noise."""
    return [seed * 100 + k for k in range(1, args.ft_seeds + 1)]


def waves(args: argparse.Namespace, arms: list[Arm]) -> list[list[tuple[Arm, int]]]:
    """Pairs of (arm, seed) to pretrain together: different arms in a pair, and no two arms in
    a pair twice while another partner is left (the runs in seed order, each paired with the
    next run whose arm differs and has not shared a wave with it yet)."""
    runs = [(a, seed) for seed in args.seeds for a in arms
            if not (run_dir(args, a, seed) / "pretrain" / "summary.json").is_file()]
    used: set[frozenset[str]] = set()
    plan = []
    while runs:
        first = runs.pop(0)
        others = [r for r in runs if r[0].slug != first[0].slug]
        fresh = [r for r in others if frozenset((first[0].slug, r[0].slug)) not in used]
        if not (fresh or others):
            plan.append([first])
            continue
        partner = (fresh or others)[0]
        runs.remove(partner)
        used.add(frozenset((first[0].slug, partner[0].slug)))
        plan.append([first, partner])
    return plan


def run_all(args: argparse.Namespace, arms: list[Arm]) -> None:
    tasks = SUITES[args.suite].tasks
    plan = waves(args, arms)
    for n, wave in enumerate(plan, 1):
        names = " + ".join(f"{a.slug}/seed{s}" for a, s in wave)
        print(f"[pretrain {n}/{len(plan)}] {names}: {args.minutes:g} {args.clock} min each",
              flush=True)
        before = os.getloadavg()[0]
        run_parallel([pretrain_job(args, a, s) for a, s in wave])
        after = os.getloadavg()[0]
        for a, s in wave:
            write_json_atomic(run_dir(args, a, s) / "conditions.json",
                              {"load_average": [round(before, 2), round(after, 2)],
                               "beside": [f"{b.slug}/seed{t}" for b, t in wave if b is not a]})
    jobs = []
    for arm in arms:
        for seed in args.seeds:
            d = run_dir(args, arm, seed)
            if not (d / "pretrain" / "summary.json").is_file():
                continue
            for task in tasks:
                if not (d / task / "results.json").is_file():
                    jobs.append(finetune_job(args, d / "pretrain" / "final", d / task, task,
                                             ft_seeds(args, seed)))
    reference = run_dir(args, arms[0], args.seeds[0]) / "pretrain" / "final"
    for task in tasks:
        out = args.out / "random-init" / task
        if reference.is_dir() and not (out / "results.json").is_file():
            seeds = [s for seed in args.seeds for s in ft_seeds(args, seed)]
            jobs.append(finetune_job(args, reference, out, task, seeds, random_init=True))
    print(f"[downstream] {len(jobs)} fine-tuning runs, two at a time", flush=True)
    run_parallel(jobs)


# --------------------------------------------------------------------------- results


def elapsed_at(train: list[dict], step: int) -> float | None:
    """Training seconds at `step`, interpolated between the logged train records."""
    points = [(0, 0.0)] + [(r["step"], r["elapsed_s"]) for r in train if "elapsed_s" in r]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return None


def time_to_target(evals: list[dict], train: list[dict], target: float,
                   budget_s: float) -> float | None:
    """The share of the budget spent when the held-out loss first reached `target` (linear
    between the two evaluations around the crossing); None if it never did."""
    previous = None
    for e in evals:
        t = elapsed_at(train, e["step"])
        if t is None:
            continue
        if e["loss"] <= target:
            if previous is None:
                return t / budget_s
            (t0, l0) = previous
            return (t0 + (t - t0) * (l0 - target) / max(l0 - e["loss"], 1e-12)) / budget_s
        previous = (t, e["loss"])
    return None


def collect_run(args: argparse.Namespace, arm: Arm, seed: int) -> dict | None:
    from motian.train.metrics import read_metrics

    d, tasks = run_dir(args, arm, seed), SUITES[args.suite].tasks
    try:
        summary = json.loads((d / "pretrain" / "summary.json").read_text(encoding="utf-8"))
        down = {task: json.loads((d / task / "results.json").read_text(encoding="utf-8"))
                for task in tasks}
    except FileNotFoundError:
        return None
    conditions = d / "conditions.json"
    metrics = d / "pretrain" / "metrics.jsonl"
    return {"arm": arm.slug, "seed": seed, "steps": summary["steps"],
            "tokens": summary["tokens_seen"], "seconds": summary["seconds"],
            "eval": summary["eval"],
            "evals": read_metrics(metrics, "eval"), "train": read_metrics(metrics, "train"),
            **(json.loads(conditions.read_text(encoding="utf-8")) if conditions.is_file()
               else {}),
            "downstream": {task: [r["test"][metric] for r in down[task]["runs"] if "test" in r]
                           for task, metric in tasks.items()},
            "baselines": {task: down[task].get("lead_baseline", {}).get("test", {}).get(metric)
                          for task, metric in tasks.items()}}


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _vs_reference(ref: list[float], arm: list[float]) -> str:
    """arm − reference in points with the noise of a difference of single runs."""
    if len(ref) < 2 or len(arm) < 2:
        return "—"
    (m_ref, s_ref), (m_arm, s_arm) = mean_std(ref), mean_std(arm)
    advantage, noise = 100 * (m_arm - m_ref), 100 * math.hypot(s_ref, s_arm)
    word = verdict(advantage, noise)
    word = {"held": "better", "did not hold": "worse"}.get(word, word)
    return f"{advantage:+.2f} ({word}; noise {noise:.2f})"


def tfidf_row(args: argparse.Namespace) -> float | None:
    try:
        from motian.finetuning import subset
        from motian.tasks.builtin import reviews_sentiment

        task = reviews_sentiment()
        train = subset(task.splits["train"], args.ft_max_train)
        return tfidf_accuracy(train, [task.splits["test"]])[0]
    except ImportError as err:  # scikit-learn is in the dev extra
        print(f"TF-IDF baseline skipped: {err}", file=sys.stderr)
        return None


def markdown(args: argparse.Namespace, arms: list[Arm], runs: list[dict],
             random_init: dict[str, list[float]], tfidf: float | None) -> str:
    import torch

    suite = SUITES[args.suite]
    tasks = suite.tasks
    by_arm = {a.slug: [r for r in runs if r["arm"] == a.slug] for a in arms}
    ref = by_arm.get(suite.reference, [])
    ref_down = {t: [v for r in ref for v in r["downstream"][t]] for t in tasks}
    task_heads = "".join(f" {t} test {m} % | vs {suite.reference} |" for t, m in tasks.items())
    lines = [f"### {args.suite.capitalize()} at equal cost: {args.minutes:g} {args.clock}-clock "
             f"minutes of pretraining each ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, fp32, 1 thread per process, runs two at a time (other jobs "
             "shared the machine; the cpu clock keeps each run's work equal regardless).",
             f"Pretraining seeds {', '.join(map(str, args.seeds))}; each model fine-tuned with "
             f"{args.ft_seeds} seed(s) per task, `motian finetune` defaults for the model"
             + (f" and {' '.join(suite.ft_options)}" if suite.ft_options else "")
             + f", at most {args.ft_max_train} training examples, test split "
             f"({args.ft_max_eval or 'all'} examples). Downstream cells: mean ± std over all "
             "(pretraining seed, fine-tuning seed) runs of the arm.", "",
             f"| arm | runs | steps | held-out loss | held-out acc % |{task_heads}",
             "|---|---:|---:|---:|---:|" + "---:|---|" * len(tasks)]
    for arm in arms:
        rs = by_arm[arm.slug]
        if not rs:
            lines.append(f"| {arm.name} | 0 |" + " — |" * (3 + 2 * len(tasks)))
            continue
        own = " (own)" if arm.slug in suite.own_eval else ""
        cells = [arm.name, str(len(rs)), _pm([r["steps"] for r in rs], 1.0, 0),
                 _pm([r["eval"]["loss"] for r in rs], 1.0, 3) + own,
                 _pm([r["eval"]["accuracy"] for r in rs]) + own]
        for t in tasks:
            values = [v for r in rs for v in r["downstream"][t]]
            cells += [_pm(values), "ref." if arm.slug == suite.reference
                      else _vs_reference(ref_down[t], values)]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["random initialisation", "—", "—", "—", "—"]
    for t in tasks:
        cells += [_pm(random_init.get(t, [])), _vs_reference(ref_down[t], random_init.get(t, []))]
    lines.append("| " + " | ".join(cells) + " |")
    lead = {t: next((r["baselines"][t] for r in runs if r["baselines"].get(t) is not None),
                    None) for t in tasks}
    baselines = [("lead baseline (the source's first N characters)", lead),
                 (f"TF-IDF char 1-2-gram + LR ({args.ft_max_train} train)",
                  {"reviews-sentiment": tfidf})]
    for name, values in baselines:
        if any(values.get(t) is not None for t in tasks):
            cells = [name, "—", "—", "—", "—"]
            for t in tasks:
                cells += ["—" if values.get(t) is None else f"{100 * values[t]:.2f}", "—"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"\"vs {suite.reference}\": arm − {suite.reference} in points; better/worse "
              "only when the difference exceeds √(std₁² + std₂²), the spread of a difference of "
              "single runs (a one-sigma rule, not a significance test). Held-out numbers marked "
              "(own) are that arm's own evaluation (ELECTRA's and MC-BERT's small generator's "
              "MLM; UNILM's masked tokens; MASS's fragments), not comparable with the others'.",
              ""]
    if ref and suite.time_to_target:
        target = sum(r["eval"]["loss"] for r in ref) / len(ref)
        lines += [f"Time to the {suite.reference} arm's final held-out loss ({target:.3f}, mean "
                  "of its seeds), as a share of the budget (interpolated between the "
                  "evaluations at every 10%):", "", "| arm | "
                  + " | ".join(f"seed {s}" for s in args.seeds) + " |",
                  "|---|" + "---:|" * len(args.seeds)]
        budget = args.minutes * 60
        for slug in (suite.reference, *suite.time_to_target):
            cells = []
            for seed in args.seeds:
                r = next((r for r in by_arm.get(slug, []) if r["seed"] == seed), None)
                share = None if r is None else time_to_target(r["evals"], r["train"], target,
                                                               budget)
                cells.append("—" if r is None else "not reached" if share is None
                             else f"{100 * share:.0f}%")
            lines.append(f"| {slug} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="encoders")
    p.add_argument("--data", type=Path, default=Path("runs/demo/encoded"))
    p.add_argument("--out", type=Path, default=Path("runs/objectives"))
    p.add_argument("--minutes", type=float, default=5.0, help="pretraining budget per run")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: each run's own CPU seconds (equal work on a shared machine)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=None, help="only these arm slugs")
    p.add_argument("--ft-seeds", type=int, default=1,
                   help="fine-tuning seeds per pretrained model and task")
    p.add_argument("--ft-max-train", type=int, default=6000)
    p.add_argument("--ft-max-eval", type=int, default=0, help="0 = the whole test split")
    p.add_argument("--report", type=Path, default=None,
                   help="a Markdown file whose objectives-results block gets the table")
    p.add_argument("--table-only", action="store_true", help="collect and print, run nothing")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if not (args.data / "manifest.json").is_file():
        sys.exit(f"{args.data}: no encoded shards (manifest.json); run `motian prepare --inputs "
                 "pd98 reviews --out runs/demo` first")
    suite = SUITES[args.suite]
    unknown = set(args.arms or []) - {a.slug for a in suite.arms}
    if unknown:
        sys.exit(f"--arms: unknown {sorted(unknown)}; choose from "
                 f"{[a.slug for a in suite.arms]}")
    arms = [a for a in suite.arms if args.arms is None or a.slug in args.arms]
    check_settings(args)
    if not args.table_only:
        run_all(args, arms)
    runs = [r for a in arms for s in args.seeds if (r := collect_run(args, a, s)) is not None]
    random_init = {}
    for task, metric in suite.tasks.items():
        path = args.out / "random-init" / task / "results.json"
        if path.is_file():
            done = json.loads(path.read_text(encoding="utf-8"))
            random_init[task] = [r["test"][metric] for r in done["runs"] if "test" in r]
    tfidf = tfidf_row(args) if "reviews-sentiment" in suite.tasks else None
    table = markdown(args, arms, runs, random_init, tfidf)
    print(table)
    (args.out / "objectives.md").write_text(table, encoding="utf-8")
    if args.report:
        update_report(args.report, table, f"{args.suite}-results")
    return 0 if len(runs) == len(arms) * len(args.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
