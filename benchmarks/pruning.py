"""Structured pruning on reviews-sentiment: accuracy at 0 / 25 / 50% of heads and FFN neurons
removed, before and after a one-epoch distilled recovery, with parameters and the latency of
one batch in PyTorch and in ONNX Runtime (both on one thread).

    .venv/bin/python benchmarks/pruning.py                  # the demo's fine-tuned classifier
    .venv/bin/python benchmarks/pruning.py --model DIR      # any fine-tuned classifier

For each fraction, `motian.prune` (importance on 1,024 training reviews, the fraction removed
from heads and from FFN neurons alike, then one recovery epoch on --max-train reviews,
distilled from the unpruned model) and `motian.export` (ONNX, parity-checked). Then every model
(unpruned and each pruned one, after recovery) is timed in PyTorch and in ONNX Runtime on the
same batch - the first --batch dev reviews, padded to the longest - in interleaved rounds.
Without --model and without the demo's classifier (runs/demo, `motian demo`), a tiny model is
fine-tuned from random weights first, so the script always runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.finetuning import finetune, load_card_task, subset
from motian.model.artifact import TaskCard
from motian.model.io import from_pretrained
from motian.pruning import prune
from motian.serving.export import export
from motian.serving.onnx import ONNX_FILE, onnx_session, run_session
from motian.task_training import TaskTraining
from motian.tasks.features import Featurizer, collate
from motian.train.settings import OptimSettings, RunSettings

DEMO = Path("runs/demo/finetune-reviews-sentiment/seed-1/model")


def interleaved_latency(models: dict[str, tuple[Path, Path]], batch: dict,
                        rounds: int = 15) -> dict[str, dict[str, float]]:
    """Median ms of one forward pass over `batch`, PyTorch and ONNX Runtime (one thread each),
    for every (checkpoint, export directory) in `models`. Round-robin: each round runs every
    model once per backend, so a load spike on the shared machine hits all of them alike."""
    nets = {name: from_pretrained(ckpt).eval() for name, (ckpt, _) in models.items()}
    sessions = {name: onnx_session(export / ONNX_FILE, threads=1)
                for name, (_, export) in models.items()}
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"torch": [], "onnx": []} for n in models}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            for name in models:
                t0 = time.perf_counter()
                nets[name](**tensors)
                t1 = time.perf_counter()
                run_session(sessions[name], batch)
                t2 = time.perf_counter()
                if r:
                    times[name]["torch"].append((t1 - t0) * 1000)
                    times[name]["onnx"].append((t2 - t1) * 1000)
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def timing_batch(model: Path, size: int) -> dict:
    """The batch `prune` times PyTorch on: the first `size` dev examples of the model's task."""
    card = TaskCard.read(model)
    task = load_card_task(card)
    tok = load_tokenizer(model / "tokenizer.json")
    special = special_token_ids(tok)
    features = Featurizer(task, tok, special, card.max_length)(subset(task.splits["dev"], None))
    return {k: v.numpy() for k, v in collate(task.type, features[:size], special["pad"]).items()
            if k != "labels"}


def quick_classifier(root: Path, max_train: int) -> Path:
    """A tiny classifier fine-tuned from random weights (when no demo model exists)."""
    finetune("reviews-sentiment", root / "finetune", random_init=True, seeds=[1],
             max_train=max_train, training=TaskTraining(epochs=1.0),
             optim=OptimSettings(lr=1e-3), run=RunSettings(progress=False))
    return root / "finetune" / "seed-1" / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"default: {DEMO} if present")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--recovery-epochs", type=float, default=1.0)
    p.add_argument("--max-train", type=int, default=6000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32, help="timing batch size")
    p.add_argument("--out", type=Path, default=Path("runs/pruning-bench"))
    args = p.parse_args()
    torch.set_num_threads(1)  # PyTorch and ONNX Runtime both on one thread
    start, load, cpu0 = time.perf_counter(), os.getloadavg(), time.process_time()
    model = args.model or (DEMO if DEMO.is_dir() else quick_classifier(args.out,
                                                                       args.max_train))
    batch = timing_batch(model, args.batch)
    rows, models = [], {"unpruned": (model, args.out / "unpruned-export")}
    export(model, args.out / "unpruned-export")
    for fraction in args.fractions:
        out = args.out / f"pruned-{round(fraction * 100)}"
        r = prune(model, out, heads=fraction, ffn=fraction,
                  recovery_epochs=args.recovery_epochs, max_train=args.max_train,
                  batch_size=32, optim=OptimSettings(lr=args.lr),
                  run=RunSettings(progress=False))
        r["onnx_max_abs_diff"] = export(out, out / "export")["onnx"]["max_abs_diff"]["logits"]
        rows.append((fraction, r))
        models[f"{fraction:.0%}"] = (out, out / "export")
    latency = interleaved_latency(models, batch)
    print(f"\nreviews-sentiment, model {model}; recovery {args.recovery_epochs:g} epoch(s) on "
          f"{args.max_train} training reviews, distilled (soft T=2 + 0.5 x labels), lr "
          f"{args.lr:g}; latency: batch {'x'.join(map(str, batch['input_ids'].shape))} of dev "
          "reviews, 1 thread, median of 15 interleaved rounds")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; load average before {load[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s wall, "
          f"{time.process_time() - cpu0:.0f} s CPU\n")
    print(table(rows, latency))


def table(rows: list[tuple[float, dict]], latency: dict[str, dict[str, float]]) -> str:
    lines = ["| removed (heads, FFN) | heads | FFN units | params (encoder) | dev acc. pruned "
             "| dev acc. recovered | test acc. pruned | test acc. recovered | PyTorch ms | "
             "ONNX ms | ONNX max abs diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---:|---:|"]
    before, t = rows[0][1]["before"], latency["unpruned"]
    lines.append(f"| unpruned | {sum(before['heads'])} | {sum(before['ffn'])} | "
                 f"{before['params']:,} ({before['encoder_params']:,}) | "
                 f"{acc(before, 'dev')} | - | {acc(before, 'test')} | - | "
                 f"{t['torch']:.1f} | {t['onnx']:.1f} | - |")
    for fraction, r in rows:
        pruned, rec = r["pruned"], r.get("recovered", r["pruned"])
        t = latency[f"{fraction:.0%}"]
        lines.append(f"| {fraction:.0%} | {sum(pruned['heads'])} | {sum(pruned['ffn'])} | "
                     f"{pruned['params']:,} ({pruned['encoder_params']:,}) | "
                     f"{acc(pruned, 'dev')} | {acc(rec, 'dev')} | {acc(pruned, 'test')} | "
                     f"{acc(rec, 'test')} | {t['torch']:.1f} | {t['onnx']:.1f} | "
                     f"{r['onnx_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def acc(r: dict, split: str) -> str:
    return f"{r['scores'][split]['accuracy'] * 100:.2f}"


if __name__ == "__main__":
    main()
