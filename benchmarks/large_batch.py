"""Large batches: does LAMB keep held-out quality as the batch grows where AdamW loses it?

    python benchmarks/large_batch.py --data runs/demo/encoded --batches 32 512 4096 \
        --tokens 786432 --seq-len 32 --lrs-per-cell 3 --out runs/large_batch/result.json

Every cell pretrains the demo model (motian/configs/demo.yaml's model section: 2 layers x 128
hidden, 4 heads, ffn 512, Pre-LN, ALiBi) on the same encoded shards for the SAME number of
training tokens (`--tokens`): a batch 16x larger takes 16x fewer optimizer steps. Cells are
global batch (`--batches`) x optimizer: AdamW, LAMB with the default "clip" gradient
pre-normalisation, and LAMB with "block" normalisation (every tensor's gradient to norm 1 on
every step, as LANS). Gradient accumulation (`--micro-batch` rows per forward pass) makes the
large batches fit; it does not change the result.

Learning rates: no single LR is fair to every batch size, so each cell is tuned on a small grid.
The grid is centred on square-root scaling from the base LR at batch 32 (`--adamw-lr`,
`--lamb-lr`): centre = base * sqrt(batch / 32), the rule You et al. 2020 use for LAMB, and
`--lrs-per-cell` values spaced by `--lr-factor` around it (3 values, factor 2: centre/2,
centre, 2*centre). The best LR by held-out MLM loss is reported; every run is printed and kept
in the JSON, and a best LR at the edge of its grid is marked (the optimum may lie outside).
`--extend-edges N` then tries up to N more LRs per cell, one at a time beyond the edge, while the
best stays at the edge. Re-running with the same --out keeps the LRs already run and runs only
the new ones (so a table can be resumed, widened or extended afterwards).

Everything else is fixed and equal across cells: single-task MLM with fixed weight 1 (the
demo's uncertainty weighting would add a learned loss scale whose dynamics depend on the LR and
the optimiser, which is not what is compared here), BERT token masking, no pair task, one stage
at `--seq-len` with linear decay after `--warmup` (a fraction of the run), weight decay 0.01,
the loop's gradient clipping at 1, `--seed` (0: model initialisation and data order). Quality
is the recipe's held-out evaluation (every 50th document never trained on, BERT masking with a
fixed seed: the same masked tokens for every run and every --seed) at the end of training, at
the training sequence length. The LR is picked on this same evaluation (there is no separate
validation split), which flatters every cell alike.

Results are written to `--out` after every run, and a re-run with the same settings skips the
runs already there (so an interrupted table resumes). Prints a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.errors import UserError  # noqa: E402
from motian.io import write_json_atomic  # noqa: E402
from motian.pretraining import pretrain_recipe  # noqa: E402
from motian.train.recipe import (  # noqa: E402
    EvalSpec,
    ObjectiveSpec,
    Recipe,
    RunSettings,
    Stage,
    load_recipe,
    to_dict,
)

# name -> (optimizer, grad_normalization); the base LR comes from the command line.
OPTIMIZERS = {"AdamW": ("adamw", "clip"), "LAMB (clip)": ("lamb", "clip"),
              "LAMB + block norm": ("lamb", "block")}
BASE_BATCH = 32  # the batch the base LRs are given for


def lr_at(base_lr: float, batch: int, k: int, factor: float) -> float:
    """The k-th LR of a cell's grid: square-root scaling of `base_lr` from BASE_BATCH to
    `batch` (k = 0), times `factor` ** k; 3 significant digits, so it prints as it is stored."""
    return float(f"{base_lr * math.sqrt(batch / BASE_BATCH) * factor ** k:.3g}")


def grid_steps(count: int) -> range:
    """The k of a `count`-LR grid around the centre (an even count has its extra LR above)."""
    low = -((count - 1) // 2)
    return range(low, low + count)


def cell_recipe(base: Recipe, batch: int, optimizer: str, normalization: str, lr: float,
                args: argparse.Namespace) -> Recipe:
    """The demo recipe reduced to one stage at `batch` x `--seq-len` for `--tokens` tokens."""
    steps = args.tokens // (batch * args.seq_len)
    if steps < 1:
        raise UserError(f"--tokens {args.tokens} is less than one step of batch {batch} x "
                        f"{args.seq_len} tokens ({batch * args.seq_len}); raise --tokens")
    optim = replace(base.optim, name=optimizer, lr=lr, grad_normalization=normalization,
                    weight_decay=0.01, clip_norm=1.0, decay="linear", min_ratio=0.0)
    data = replace(base.data, masking="bert", pair_task="none", seed=args.seed)
    return replace(
        base, name=f"large-batch-{batch}-{optimizer}-{normalization}-{lr:g}", data=data,
        objective=ObjectiveSpec(kind="mlm", weighting="fixed", weights={"mlm": 1.0}),
        optim=optim, stages=(Stage(fraction=1.0, seq_len=args.seq_len, global_batch=batch,
                                   warmup=args.warmup, name="only"),),
        steps=steps, budget_minutes=0.0, checkpoint_every=0, keep_last=1, seed=args.seed,
        eval=EvalSpec(every=0, holdout_every=base.eval.holdout_every,
                      seq_len=args.eval_seq_len or args.seq_len, rows=args.eval_rows,
                      batch=32, seed=base.eval.seed))


def run_one(recipe: Recipe, args: argparse.Namespace, work: Path) -> dict:
    batch = recipe.stages[0].global_batch
    run = RunSettings(device=args.device, threads=args.threads, progress=False,
                      micro_batch=min(args.micro_batch, batch))
    run_dir = work / recipe.name
    if run_dir.exists():  # a leftover of an interrupted run: start it over
        shutil.rmtree(run_dir)
    started = time.time()
    summary = pretrain_recipe(recipe, run, Path(args.data), run_dir)
    seconds = time.time() - started
    final = summary.get("eval") or {}
    shutil.rmtree(run_dir, ignore_errors=True)  # weights are not needed, only the numbers
    return {"steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
            "seconds": round(seconds, 1), "eval": final}


def loss_of(result: dict) -> float:
    """Held-out MLM loss at the end (NaN when the run had no evaluation)."""
    return float(result["eval"].get("loss", math.nan))


def accuracy_of(result: dict) -> float:
    return float(result["eval"].get("accuracy", math.nan))


def best_of(runs: list[dict]) -> dict | None:
    finite = [r for r in runs if math.isfinite(loss_of(r))]
    return min(finite, key=loss_of) if finite else None


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [f"Equal tokens: {settings['tokens']:,} per run at seq_len {settings['seq_len']}; "
             "held-out MLM loss / accuracy at the end, best LR of the grid (* = at the "
             "grid's edge).", "",
             "| global batch | steps | " + " | ".join(OPTIMIZERS) + " |",
             "|---|---|" + "---|" * len(OPTIMIZERS)]
    for batch in settings["batches"]:
        cells = []
        steps = "?"
        for name in OPTIMIZERS:
            runs = [r for r in results["runs"] if r["batch"] == batch and r["optimizer"] == name]
            best = best_of(runs)
            if best is None:
                cells.append("diverged" if runs else "not run")
                continue
            steps = best["steps"]
            lrs = sorted(r["lr"] for r in runs)
            edge = "*" if best["lr"] in (lrs[0], lrs[-1]) and len(lrs) > 1 else ""
            cells.append(f"{loss_of(best):.3f} / {100 * accuracy_of(best):.1f}% "
                         f"(lr {best['lr']:g}{edge})")
        lines.append(f"| {batch} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", "Every run:", "", "| global batch | optimizer | lr | steps | loss | accuracy "
              "| seconds |", "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['batch']} | {r['optimizer']} | {r['lr']:g} | {r['steps']} | "
                     f"{loss_of(r):.3f} | {100 * accuracy_of(r):.1f}% | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/demo/encoded", help="encoded shards")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 512, 4096],
                        help="global batches (sequences per optimizer step)")
    parser.add_argument("--tokens", type=int, default=786_432,
                        help="training tokens per run, equal for every cell")
    parser.add_argument("--seq-len", type=int, default=32, help="training sequence length")
    parser.add_argument("--eval-seq-len", type=int, default=0,
                        help="held-out evaluation sequence length; 0 = --seq-len")
    # 1024 rows of 32 tokens: as many tokens as the demo's 256 x 128 common evaluation.
    parser.add_argument("--eval-rows", type=int, default=1024, help="held-out rows evaluated")
    parser.add_argument("--lrs-per-cell", type=int, default=3, help="LR grid size per cell")
    parser.add_argument("--lr-factor", type=float, default=2.0,
                        help="ratio between neighbouring LRs of a cell's grid")
    parser.add_argument("--adamw-lr", type=float, default=2e-3,
                        help="AdamW base LR at batch 32 (the demo recipe's)")
    parser.add_argument("--lamb-lr", type=float, default=2e-2,
                        help="LAMB base LR at batch 32 (both normalisations)")
    parser.add_argument("--extend-edges", type=int, default=0,
                        help="up to this many extra LRs per cell, one at a time beyond the "
                             "grid's edge while the best LR is at the edge")
    parser.add_argument("--warmup", type=float, default=0.05,
                        help="warm-up, fraction of each run")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS), help="a subset of the cells' optimisers")
    parser.add_argument("--seed", type=int, default=0,
                        help="model initialisation and data order (the evaluation set is fixed)")
    parser.add_argument("--micro-batch", type=int, default=64,
                        help="rows per forward pass (accumulation; does not change results)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--work", default="", help="run directories (default: a temporary one)")
    parser.add_argument("--out", required=True, help="JSON results (also the resume point)")
    args = parser.parse_args()
    if args.lrs_per_cell < 1 or args.lr_factor <= 1:
        sys.exit("--lrs-per-cell must be >= 1 and --lr-factor > 1")
    # Refuse a table that would fail half-way (after an hour of the cells before it).
    for batch in args.batches:
        if args.tokens < batch * args.seq_len:
            sys.exit(f"--tokens {args.tokens} is less than one step of batch {batch} x "
                     f"{args.seq_len} tokens ({batch * args.seq_len}); raise --tokens")
        if batch % min(args.micro_batch, batch):
            sys.exit(f"--micro-batch {args.micro_batch} does not divide batch {batch}; choose "
                     "one that divides every --batches value")
    if args.threads > 0:  # 0: torch's default (all cores), as RunSettings.threads
        torch.set_num_threads(args.threads)
    base = load_recipe("demo")
    settings = {k: getattr(args, k) for k in (
        "batches", "tokens", "seq_len", "eval_seq_len", "eval_rows", "lrs_per_cell",
        "lr_factor", "adamw_lr", "lamb_lr", "warmup", "seed")}
    settings["data"] = str(Path(args.data).resolve())
    settings["model"] = to_dict(base.model)
    out = Path(args.out)
    results = {"settings": settings, "runs": []}
    if out.is_file():
        previous = json.loads(out.read_text(encoding="utf-8"))
        # Resume only a table of the same settings; a different one is not silently mixed in.
        # Other batches, or a wider grid (same centre and factor, so a superset of the same LRs:
        # how a cell whose best LR was at the edge is extended), add to the same table.
        growable = ("batches", "lrs_per_cell")
        if {k: v for k, v in previous["settings"].items() if k not in growable} == \
                {k: v for k, v in settings.items() if k not in growable}:
            results["runs"] = previous["runs"]
        else:
            sys.exit(f"{out} holds results of other settings; give another --out")
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": args.device,
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                          and args.device != "cpu" else None}
    runs = {(r["batch"], r["optimizer"], r["lr"]): r for r in results["runs"]}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="motian-large-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        for name in args.optimizers:
            optimizer, normalization = OPTIMIZERS[name]
            base_lr = args.adamw_lr if optimizer == "adamw" else args.lamb_lr
            ks = list(grid_steps(args.lrs_per_cell))
            extra = 0
            while True:
                for k in ks:
                    lr = lr_at(base_lr, batch, k, args.lr_factor)
                    if (batch, name, lr) in runs:
                        continue
                    recipe = cell_recipe(base, batch, optimizer, normalization, lr, args)
                    result = {"batch": batch, "optimizer": name, "lr": lr,
                              **run_one(recipe, args, work)}
                    runs[(batch, name, lr)] = result
                    results["runs"].append(result)
                    write_json_atomic(out, results)
                    print(f"batch {batch:>5} {name:<18} lr {lr:<8g} steps "
                          f"{result['steps']:>5} loss {loss_of(result):.3f} acc "
                          f"{100 * accuracy_of(result):.1f}% ({result['seconds']:.0f} s)",
                          flush=True)
                # --extend-edges: while the best LR is the lowest or highest one tried, try one
                # more beyond it (the optimum may lie outside the grid).
                centre = base_lr * math.sqrt(batch / BASE_BATCH)
                tried = {round(math.log(lr / centre, args.lr_factor)): r
                         for (b, n, lr), r in runs.items() if (b, n) == (batch, name)}
                best = best_of(list(tried.values()))
                if extra >= args.extend_edges or best is None or len(tried) < 2:
                    break
                best_k = next(k for k, r in tried.items() if r is best)
                if best_k == min(tried):
                    ks = [best_k - 1]
                elif best_k == max(tried):
                    ks = [best_k + 1]
                else:
                    break
                extra += 1
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown(results))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # bad data path, recipe or settings: the message, no traceback
        sys.exit(f"error: {err}")
