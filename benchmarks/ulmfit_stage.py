"""ULMFiT's target-task LM stage on the reviews: does `motian adapt` help a model pretrained on
other text (news) before it is fine-tuned on review sentiment?

    python benchmarks/ulmfit_stage.py --base runs/entity_masking/whole-word --seeds 1 2 3 \
        --steps 150 --out runs/ulmfit_stage

The starting models are news-only: `--base`/seedN is a pretraining run that read People's
Daily articles and no reviews (by default benchmarks/entity_masking.py's whole-word arm,
pretrained on pd98-ner's training articles). For each seed N two arms fine-tune
`reviews-sentiment` with the same settings and fine-tuning seed 100 N + 1:

- direct: `motian finetune` from the news model;
- adapted: `motian adapt` (masked-LM on the task's training texts, labels unread, STLR, --steps
  steps) first, then `motian finetune` from the adapted model.

The demo corpus holds the reviews' training texts, so a demo model has nothing to gain from the
stage (docs/knowledge.md); a news model is the case ULMFiT's stage is for. Every step is an
ordinary CLI run under --out/seedN/ with its log; finished steps are skipped, so re-running the
command continues. Prints a markdown table (mean +- std over seeds; a difference is called only
beyond sqrt(std1^2 + std2^2), docs/objectives.md's rule).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ablation import run_parallel  # noqa: E402

TASK = "reviews-sentiment"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "motian.cli", *args]


def jobs_for(seed: int, args: argparse.Namespace) -> tuple[list, list]:
    """(adapt jobs, fine-tuning jobs) still to run for one seed."""
    base, out = args.base / f"seed{seed}", args.out / f"seed{seed}"
    common = ["--max-train", str(args.max_train), "--threads", "1", "--device", "cpu"]
    adapt, finetune = [], []
    lm = out / "adapted-lm"
    if not (lm / "final").is_dir():
        adapt.append((_cli("adapt", "--task", TASK, "--model", str(base), "--out", str(lm),
                           "--steps", str(args.steps), "--resume", *common), out / "adapt.log"))
    for arm, model in (("direct", base), ("adapted", lm)):
        if not (out / arm / "results.json").is_file():
            finetune.append((_cli("finetune", "--task", TASK, "--model", str(model), "--out",
                                  str(out / arm), "--seeds", str(100 * seed + 1),
                                  "--no-save-model", "--no-progress", *common),
                             out / f"{arm}.log"))
    return adapt, finetune


def score(path: Path) -> float:
    summary = json.loads(path.read_text(encoding="utf-8"))["summary"]
    return 100 * summary["test"]["accuracy"][0]


def lm_losses(run: Path) -> tuple[float, float]:
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("kind") == "eval" and "loss" in e]
    return evals[0]["loss"], evals[-1]["loss"]


def _pm(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(args: argparse.Namespace) -> str:
    direct, adapted, before, after = [], [], [], []
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        if not ((out / "direct" / "results.json").is_file()
                and (out / "adapted" / "results.json").is_file()):
            continue
        direct.append(score(out / "direct" / "results.json"))
        adapted.append(score(out / "adapted" / "results.json"))
        b, a = lm_losses(out / "adapted-lm")
        before.append(b)
        after.append(a)
    if not direct:
        return "no finished seed yet"
    diff = statistics.mean(adapted) - statistics.mean(direct)
    noise = (statistics.stdev(adapted) ** 2 + statistics.stdev(direct) ** 2) ** 0.5 \
        if len(direct) > 1 else float("nan")
    if len(direct) < 2:
        call = "one seed: no noise estimate"
    else:
        call = "within noise" if abs(diff) <= noise else ("better" if diff > 0 else "worse")
    return "\n".join([
        f"| starting model (news-only pretraining, {len(direct)} seeds) | reviews held-out "
        "masked-token loss | reviews-sentiment test accuracy % | vs direct |",
        "|---|---:|---:|---|",
        f"| news model, fine-tuned directly | {_pm(before)} | {_pm(direct)} | ref. |",
        f"| news model + `motian adapt` ({args.steps} steps), then fine-tuned | {_pm(after)} | "
        f"{_pm(adapted)} | {diff:+.2f} ({call}; noise {noise:.2f}) |"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("runs/entity_masking/whole-word"),
                   help="directory of news-only pretraining runs seed1, seed2, ...")
    p.add_argument("--out", type=Path, default=Path("runs/ulmfit_stage"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of the LM stage")
    p.add_argument("--max-train", type=int, default=6000)
    p.add_argument("--together", type=int, default=2, help="runs at a time")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    for seed in args.seeds:
        if not (args.base / f"seed{seed}").is_dir():
            sys.exit(f"{args.base / f'seed{seed}'}: no pretraining run; run "
                     "benchmarks/entity_masking.py --arm whole-word --seeds ... first, or pass "
                     "--base")
    if not args.table_only:
        todo = [jobs_for(seed, args) for seed in args.seeds]
        run_parallel([job for adapt, _ in todo for job in adapt], args.together)
        todo = [jobs_for(seed, args) for seed in args.seeds]  # after the stages
        codes = run_parallel([job for _, ft in todo for job in ft], args.together)
        if any(codes):
            return 1
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
