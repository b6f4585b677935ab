"""The recipe ablation: which claims of the Motian report hold at a scale a user can run?

    python benchmarks/ablation.py --data runs/demo/encoded --minutes 10 --downstream-seeds 3 \
        --out runs/ablation --report docs/ablation.md

Every arm pretrains the demo model size (4 layers x 128 hidden, 128 tokens x 64 rows per step)
on the same encoded shards for the same wall-clock budget, then is evaluated the same way:

- the common held-out MLM evaluation that `fit` records (BERT token masking at 15% of held-out
  documents with a fixed seed: the same masked tokens for every model);
- fine-tuning on reviews-sentiment (test accuracy) and pd98-ner (test entity F1), each with
  `--downstream-seeds` seeds and a small budget, mean ± std.

Arms: the BERT baseline scaled to the demo size (Post-LN, absolute positions, token masking
80/10/10, AdamW, SOP, fixed loss weights); the Motian recipe (T5 relative positions, phrase +
word masking with Cilin synonyms, SOP, uncertainty weighting, Pre-LN, LAMB); the Motian recipe
with one ingredient removed at a time; and the Motian recipe again with another seed, whose
distance from the first run is the only noise estimate the unseeded MLM evaluation has.

Pretraining runs two arms at a time, one thread each, so the two cores' load hits both alike;
an odd arm out never runs alone. Each arm is a plain `motian pretrain` / `motian finetune` run
under --out/<arm>/, and an arm whose result.json exists is skipped, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pretrain import with_settings  # noqa: E402
from motian.data.shards import write_json_atomic  # noqa: E402
from motian.tasks.metrics import mean_std  # noqa: E402
from motian.train.recipe import Recipe, save_recipe  # noqa: E402

TASKS = {"reviews-sentiment": "accuracy", "pd98-ner": "f1"}  # task -> main metric (test split)


@dataclass(frozen=True)
class Arm:
    name: str
    slug: str  # directory name under --out
    sets: tuple[str, ...]  # `--set` overrides of the demo recipe
    claim: str = ""  # the claim of the Motian report this arm tests (vs the Motian arm)


def motian_sets(lamb_lr: float) -> list[str]:
    """The Motian ingredients on top of motian/configs/demo.yaml (it fixes size, data, schedule)."""
    return ["model.overrides.norm=pre", "model.overrides.position=t5", "data.masking=motian",
            "data.pair_task=sop", "objective.weighting=uncertainty", "optim.name=lamb",
            f"optim.lr={lamb_lr}"]


def arms(lamb_lr: float, adamw_lr: float) -> list[Arm]:
    m = motian_sets(lamb_lr)
    bert = ["model.overrides.norm=post", "model.overrides.position=absolute",
            "model.overrides.layer_norm_eps=1.0e-12", "data.masking=bert", "data.pair_task=sop",
            "objective.weighting=fixed", "optim.name=adamw", f"optim.lr={adamw_lr}"]
    return [
        Arm("BERT baseline", "bert", tuple(bert), "the Motian recipe beats BERT's"),
        Arm("Motian", "motian", tuple(m)),
        Arm("Motian, relative → absolute", "no-relative",
            (*m, "model.overrides.position=absolute"),
            "relative positions lower MLM loss at equal cost, +~1 point downstream"),
        Arm("Motian, synonym → [MASK]", "no-synonym",
            (*m, "data.masking_overrides={mask_prob: 0.8, synonym_prob: 0.0}"),
            "synonym replacement beats [MASK]"),
        Arm("Motian, phrase/word → token masking", "no-phrase-word",
            (*m, "data.masking_overrides={strategy: token}"),
            "phrase + word masking beats character masking"),
        Arm("Motian, pair task off", "no-pair", (*m, "data.pair_task=none"),
            "the pair task helps (the report: on pair tasks; none is measured here)"),
        Arm("Motian, uncertainty → fixed weights", "no-uncertainty",
            (*m, "objective.weighting=fixed"), "uncertainty weighting balances the losses"),
        Arm("Motian, Pre-LN → Post-LN", "no-pre-ln", (*m, "model.overrides.norm=post"),
            "Pre-LN converges better (the report: at large batches)"),
        Arm("Motian, LAMB → AdamW", "no-lamb", (*m, "optim.name=adamw", f"optim.lr={adamw_lr}"),
            "LAMB converges better (the report: at large batches)"),
        Arm("Motian, seed 1 (noise)", "motian-seed1", (*m, "seed=1", "data.seed=1")),
    ]


def arm_recipe(arm: Arm, minutes: float, steps: int = 0) -> Recipe:
    """The arm's recipe at `minutes` of wall-clock, or at `steps` optimizer steps if given."""
    recipe = replace(with_settings("demo", list(arm.sets)), name=f"ablation-{arm.slug}")
    if steps:
        return replace(recipe, budget_minutes=0.0, steps=steps)
    return replace(recipe, budget_minutes=minutes)


# --------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    # One thread per process: two arms share the two cores alike (and torch's default of all
    # cores per process would make them fight over the same ones).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_parallel(jobs: list[tuple[list[str], Path]], together: int = 2) -> list[int]:
    """Run the commands `together` at a time, each logging to its file; wave by wave, so the
    jobs of a wave start and compete together. Returns their exit codes."""
    codes = []
    for i in range(0, len(jobs), together):
        wave = []
        for cmd, log in jobs[i:i + together]:
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("a", encoding="utf-8")
            handle.write(f"$ {shlex.join(cmd)}\n")
            handle.flush()
            wave.append((subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                          env=_env()), handle, log))
        for proc, handle, log in wave:
            codes.append(proc.wait())
            handle.close()
            if codes[-1]:
                tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
                print(f"FAILED ({codes[-1]}): {log}\n  " + "\n  ".join(tail), file=sys.stderr)
    return codes


def pretrain_job(arm: Arm, args: argparse.Namespace) -> tuple[list[str], Path]:
    arm_dir = args.out / arm.slug
    arm_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(arm_recipe(arm, args.minutes, args.steps), arm_dir / "recipe.yaml")
    cmd = [sys.executable, "-m", "motian.cli", "pretrain", "--recipe",
           str(arm_dir / "recipe.yaml"), "--data", str(args.data), "--out",
           str(arm_dir / "pretrain"), "--resume", "--device", "cpu", "--threads", "1",
           "--no-progress"]
    return cmd, arm_dir / "pretrain.log"


def finetune_job(arm: Arm, task: str, args: argparse.Namespace) -> tuple[list[str], Path]:
    arm_dir = args.out / arm.slug
    seeds = [str(s) for s in range(1, args.downstream_seeds + 1)]
    cmd = [sys.executable, "-m", "motian.cli", "finetune", "--task", task, "--out",
           str(arm_dir / task), "--model", str(arm_dir / "pretrain" / "final"), "--tokenizer",
           str(args.tokenizer), "--seeds", *seeds, "--epochs", str(args.ft_epochs),
           "--batch-size", str(args.ft_batch_size), "--lr", str(args.ft_lr), "--max-length",
           str(args.ft_max_length), "--max-train", str(args.ft_max_train), "--no-save-model",
           "--device", "cpu", "--no-progress"]
    if args.ft_max_eval:
        cmd += ["--max-eval", str(args.ft_max_eval)]
    return cmd, arm_dir / f"{task}.log"


def collect(arm: Arm, args: argparse.Namespace) -> dict:
    """The arm's numbers from its pretraining summary, metrics and fine-tuning results."""
    from motian.train.metrics import read_metrics

    run = args.out / arm.slug / "pretrain"
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    conditions = json.loads((run.parent / "conditions.json").read_text(encoding="utf-8"))
    evals = read_metrics(run / "metrics.jsonl", "eval")
    result = {"arm": arm.name, "slug": arm.slug, "sets": list(arm.sets), "claim": arm.claim,
              "minutes": args.minutes, "steps": summary["steps"],
              "tokens": summary["tokens_seen"], "train_seconds": round(summary["seconds"], 1),
              "eval": summary["eval"], "untrained": evals[0] if evals else None,
              **conditions, "settings": settings_key(arm, args), "downstream": {}}
    for task, metric in TASKS.items():
        done = json.loads((args.out / arm.slug / task / "results.json").read_text("utf-8"))
        values = [r["test"][metric] for r in done["runs"] if "test" in r]
        mean, std = mean_std(values)
        result["downstream"][task] = {"metric": metric, "split": "test", "values": values,
                                      "mean": mean, "std": std}
    return result


def settings_key(arm: Arm, args: argparse.Namespace) -> dict:
    """What an arm's result depends on; a cached result.json with other settings is refused."""
    return {"sets": list(arm.sets), "minutes": args.minutes, "steps": args.steps,
            "data": str(args.data),
            "seeds": args.downstream_seeds,
            **{k: getattr(args, k) for k in ("ft_max_train", "ft_max_eval", "ft_epochs",
                                             "ft_lr", "ft_batch_size", "ft_max_length")}}


def check_cached(arm: Arm, args: argparse.Namespace) -> bool:
    """True if the arm has a result.json made with these settings; exits if it has one made
    with others (mixing them in one table would compare unlike things)."""
    path = args.out / arm.slug / "result.json"
    if not path.is_file():
        return False
    if json.loads(path.read_text(encoding="utf-8")).get("settings") != settings_key(arm, args):
        sys.exit(f"{path}: made with other settings than this command's; use another --out, "
                 "or delete that arm's directory to redo it")
    return True


def run_arms(todo: list[Arm], args: argparse.Namespace) -> None:
    """Pretrain the arms two at a time, then fine-tune them. Writes per arm conditions.json:
    the 1-minute load average at the start and end of its pretraining (what else ran on the
    machine) and the arm that ran beside it."""
    need = [a for a in todo if not (args.out / a.slug / "pretrain" / "summary.json").is_file()]
    waves = [need[i:i + 2] for i in range(0, len(need), 2)]
    for n, wave in enumerate(waves, 1):
        names = " + ".join(a.name for a in wave)
        print(f"[pretrain {n}/{len(waves)}] {names}: {_length(args)} each", flush=True)
        if len(wave) == 1:
            print(f"  note: {wave[0].name} runs alone (an odd arm out): it gets the cores to "
                  "itself, which favours it; the table says so", flush=True)
        before = os.getloadavg()[0]
        run_parallel([pretrain_job(a, args) for a in wave])
        after = os.getloadavg()[0]
        for a in wave:  # kept beside the run, so a later re-collection still has them
            write_json_atomic(args.out / a.slug / "conditions.json",
                              {"load_average": [round(before, 2), round(after, 2)],
                               "beside": [b.slug for b in wave if b is not a]})
    ready = [a for a in todo if (args.out / a.slug / "pretrain" / "summary.json").is_file()]
    jobs = [finetune_job(a, task, args) for a in ready for task in TASKS]
    print(f"[downstream] {len(jobs)} fine-tuning runs ({args.downstream_seeds} seeds each), "
          "two at a time", flush=True)
    run_parallel(jobs)



# --------------------------------------------------------------------------- conclusions


def verdict(advantage: float, noise: float | None) -> str:
    """`advantage` > 0: the full Motian recipe did better than the arm without the ingredient.
    Within noise when the difference is no larger than the noise of a difference (a rough
    one-sigma rule, not a significance test)."""
    if noise is None or math.isnan(noise):
        return "no noise estimate"
    if abs(advantage) <= noise:
        return "within noise"
    return "held" if advantage > 0 else "did not hold"


def _mlm_noise(by_slug: dict[str, dict]) -> float | None:
    """|loss(Motian) − loss(Motian, seed 1)|: one sample of the run-to-run difference, the only
    noise estimate the unseeded MLM evaluation has."""
    a, b = by_slug.get("motian"), by_slug.get("motian-seed1")
    if a is None or b is None:
        return None
    return abs(a["eval"]["loss"] - b["eval"]["loss"])


def _task_cell(motian: dict, arm: dict, task: str) -> str:
    m, a = motian["downstream"][task], arm["downstream"][task]
    advantage = 100 * (m["mean"] - a["mean"])
    n = min(len(m["values"]), len(a["values"]))
    noise = 100 * math.hypot(m["std"], a["std"]) if n > 1 else None
    return f"{verdict(advantage, noise)} (Motian − arm {advantage:+.2f} points" + (
        f"; noise {noise:.2f})" if noise is not None else "; 1 seed)")


def conclusions(results: list[dict]) -> list[str]:
    by_slug = {r["slug"]: r for r in results}
    motian = by_slug.get("motian")
    if motian is None:
        return ["The Motian arm has no result yet: nothing to compare against."]
    noise = _mlm_noise(by_slug)
    lines = ["| without / instead | claim tested | held-out MLM loss | reviews accuracy | "
             "NER F1 |", "|---|---|---|---|---|"]
    for r in results:
        if r["slug"] in ("motian", "motian-seed1"):
            continue
        advantage = r["eval"]["loss"] - motian["eval"]["loss"]
        mlm = f"{verdict(advantage, noise)} (Motian − arm {-advantage:+.3f} nats" + (
            f"; noise {noise:.3f})" if noise is not None else "; no repeat run)")
        lines.append(f"| {r['arm']} | {r['claim']} | {mlm} | "
                     f"{_task_cell(motian, r, 'reviews-sentiment')} | "
                     f"{_task_cell(motian, r, 'pd98-ner')} |")
    return lines


def _pm(d: dict) -> str:
    return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"


def results_table(results: list[dict]) -> list[str]:
    lines = ["| arm | steps | tokens | train s | held-out MLM acc % | held-out loss | "
             "reviews acc % | NER F1 % | ran beside (load avg start→end) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        e, d = r["eval"], r["downstream"]
        load = r.get("load_average") or ["?", "?"]
        beside = ", ".join(r.get("beside") or []) or "alone"
        lines.append(f"| {r['arm']} | {r['steps']:,} | {r['tokens']:,} | "
                     f"{r['train_seconds']:.0f} | "
                     f"{100 * e['accuracy']:.2f} | {e['loss']:.3f} | "
                     f"{_pm(d['reviews-sentiment'])} | {_pm(d['pd98-ner'])} | "
                     f"{beside} ({load[0]}→{load[1]}) |")
    return lines


def markdown(results: list[dict], missing: list[str], args: argparse.Namespace) -> str:
    import torch

    seeds = args.downstream_seeds
    lines = [f"### Ablation, {_length(args)} of pretraining per arm "
             f"({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, fp32, 1 thread per process, arms pretrained two at a time.",
             f"Data: `{args.data}`; tokenizer `{args.tokenizer}`. Downstream: {seeds} seed(s), "
             f"{args.ft_max_train} training examples, {args.ft_epochs:g} epoch(s), lr "
             f"{args.ft_lr:g}, batch {args.ft_batch_size}, max length {args.ft_max_length}, "
             f"test split ({args.ft_max_eval or 'all'} examples).", "",
             *results_table(results), ""]
    if missing:
        lines += [f"Not finished (see their logs under `{args.out}`): {', '.join(missing)}.", ""]
    lines += ["Conclusions (each ablated arm against the full Motian arm; \"held\" = the "
              "ingredient helped by more than the noise):", "", *conclusions(results), "",
              "Noise: downstream, √(std₁² + std₂²) of the two arms' per-seed scores (the spread "
              "of a difference of single runs); held-out MLM loss has no seeds "
              "(one pretraining run per arm), so its noise is the distance between the Motian "
              "arm and the same recipe with another seed (a single sample: rough).", ""]
    return "\n".join(lines)


def _length(args: argparse.Namespace) -> str:
    return f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"


def update_report(path: Path, table: str, marker: str = "ablation-results") -> None:
    """Put the table between the `marker` result comments of `path` (appended if it has
    none)."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/demo/encoded"))
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="default: <data>/../tokenizer if it exists, else <data> (its vocab.txt)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining wall-clock per arm")
    p.add_argument("--steps", type=int, default=0,
                   help="a fixed step count per arm instead of --minutes: equal work, not equal "
                        "cost (a slower ingredient is not charged for its time)")
    p.add_argument("--arms", nargs="+", default=None, help="only these arm slugs")
    p.add_argument("--lamb-lr", type=float, default=4e-3)
    p.add_argument("--adamw-lr", type=float, default=2e-3)
    p.add_argument("--downstream-seeds", type=int, default=3)
    p.add_argument("--ft-max-train", type=int, default=1000)
    p.add_argument("--ft-max-eval", type=int, default=1000, help="0 = the whole test split")
    p.add_argument("--ft-epochs", type=float, default=1.0)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-batch-size", type=int, default=32)
    p.add_argument("--ft-max-length", type=int, default=64)
    p.add_argument("--report", type=Path, default=None,
                   help="also put the table in this Markdown file (between result markers)")
    args = p.parse_args()
    if args.tokenizer is None:
        sibling = args.data.parent / "tokenizer"
        args.tokenizer = sibling if (sibling / "tokenizer.json").is_file() else args.data
    return args


def main() -> int:
    args = parse_args()
    if not (args.data / "manifest.json").is_file():
        sys.exit(f"{args.data}: no encoded shards (manifest.json); run `motian prepare --inputs "
                 "pd98 reviews --out runs/demo` first")
    every = arms(args.lamb_lr, args.adamw_lr)
    unknown = set(args.arms or []) - {a.slug for a in every}
    if unknown:
        sys.exit(f"--arms: unknown {sorted(unknown)}; choose from {[a.slug for a in every]}")
    selected = [a for a in every if args.arms is None or a.slug in args.arms]
    todo = [a for a in selected if not check_cached(a, args)]
    print(f"{len(selected) - len(todo)} arm(s) already done; {len(todo)} to run -> {args.out}")
    if todo:
        run_arms(todo, args)
    results, missing = [], []
    for arm in selected:
        path = args.out / arm.slug / "result.json"
        if not path.is_file():
            try:
                write_json_atomic(path, collect(arm, args))
            except FileNotFoundError as err:
                missing.append(f"{arm.slug} ({Path(err.filename).name} missing)")
                continue
        results.append(json.loads(path.read_text(encoding="utf-8")))
    table = markdown(results, missing, args)
    print(table)
    (args.out / "ablation.md").write_text(table, encoding="utf-8")
    if args.report:
        update_report(args.report, table)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
