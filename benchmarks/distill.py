"""Distillation on reviews-sentiment: teacher vs distilled student vs the same student trained
without a teacher, over several seeds, with parameters and encoder FLOPs per token.

    .venv/bin/python benchmarks/distill.py                         # random-init 4 x 64 teacher
    .venv/bin/python benchmarks/distill.py --init runs/pretrain/x  # teacher from a checkpoint

1. The teacher: `motian finetune` from `--init` (its tokenizer found beside it), or from random
   weights of `--teacher-shape` with a vocabulary trained on the task's training reviews.
   Fine-tuned with every seed (its spread is reported); the first seed's model is the teacher.
2. The student (half the layers and half the hidden size by default, <= 1/4 of the teacher's
   compute): `motian distill` with soft targets, hard labels, hidden states and attention maps,
   and its baseline - the same student, initialisation and schedule on the hard labels alone.
3. A Markdown table: model, shape, parameters, FLOPs per token, dev and test accuracy
   mean ± std, % of the teacher; the run directories keep everything (results.json / .md).

Time the teacher against the student afterwards with benchmarks/serving.py, giving both model
directories as --checkpoint (the printed command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from motian.data.tokenizer import train_tokenizer
from motian.distillation import distill
from motian.finetuning import finetune, subset
from motian.model import MaskedLM, preset, save_pretrained
from motian.reporting.tables import fmt
from motian.tasks.builtin import load_builtin
from motian.tasks.metrics import mean_std


def random_teacher_start(root: Path, shape: list[int], max_train: int | None) -> Path:
    """A random-weight MaskedLM of `shape` (layers, hidden, heads, ffn) with a vocabulary
    trained on the training reviews only, saved as a checkpoint finetune starts from."""
    train = subset(load_builtin("reviews-sentiment").splits["train"], max_train)
    corpus = root / "train-reviews.txt"
    corpus.write_text("\n".join(e.text for e in train) + "\n", encoding="utf-8")
    tok = root / "tokenizer"
    train_tokenizer([str(corpus)], tok, vocab_size=8000, progress=False)
    vocab = sum(1 for _ in open(tok / "vocab.txt", encoding="utf-8"))
    layers, hidden, heads, ffn = shape
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=vocab, layers=layers, hidden=hidden, heads=heads, ffn=ffn)
    directory = save_pretrained(MaskedLM(config), root / "teacher-init")
    (directory / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    return directory


def table(teacher: dict, result: dict) -> str:
    """Teacher (all its seeds, and the one distilled), student and baseline, per split."""
    lines = ["| model | layers × hidden | params | FLOPs/token | dev acc. | test acc. "
             "| % of teacher (test) |", "|---|---|---:|---:|---:|---:|---:|"]
    top = result["teacher"]["scores"]["test"]["accuracy"]

    def row(name: str, d: dict, runs: list[dict]) -> str:
        cells = []
        for split in ("dev", "test"):
            mean, std = mean_std([r[split]["accuracy"] for r in runs])
            cells.append(fmt(mean, std))
        share = mean_std([r["test"]["accuracy"] for r in runs])[0] / top * 100
        return (f"| {name} | {d['layers']} × {d['hidden']} | {d['params'] / 1e6:.2f}M | "
                f"{d['flops_per_token'] / 1e6:.2f}M | {cells[0]} | {cells[1]} | {share:.1f} |")

    t = result["teacher"]
    lines.append(row(f"teacher, fine-tuned ({len(teacher['runs'])} seeds)", t, teacher["runs"]))
    lines.append(row("teacher distilled from (seed 1)", t, [t["scores"]]))
    lines.append(row(f"student, distilled ({len(result['student']['runs'])} seeds)",
                     result["student"], result["student"]["runs"]))
    lines.append(row(f"student, no teacher ({len(result['baseline']['runs'])} seeds)",
                     result["baseline"], result["baseline"]["runs"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", type=Path, default=None, help="pretrained motian checkpoint")
    p.add_argument("--tokenizer", type=Path, default=None, help="with --init, if not beside it")
    p.add_argument("--teacher-shape", type=int, nargs=4, default=[4, 64, 4, 256],
                   metavar=("LAYERS", "HIDDEN", "HEADS", "FFN"), help="without --init")
    p.add_argument("--student-layers", type=int, default=None, help="default: half")
    p.add_argument("--student-hidden", type=int, default=None, help="default: half")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--student-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", type=int, default=4000)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha-soft", type=float, default=1.0)
    p.add_argument("--alpha-hard", type=float, default=0.5)
    p.add_argument("--alpha-hidden", type=float, default=1.0)
    p.add_argument("--alpha-attention", type=float, default=1.0)
    p.add_argument("--student-init", choices=["teacher-layers", "fresh"],
                   default="teacher-layers")
    p.add_argument("--pooling", choices=["cls", "mean"], default=None,
                   help="what the teacher's classifier reads (the student inherits it)")
    p.add_argument("--out", type=Path, default=Path("runs/distill-bench"))
    p.add_argument("--name", default="student", help="the student run's folder under --out "
                   "(another name compares student settings against the same teachers)")
    args = p.parse_args()
    start, load = time.perf_counter(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    init = args.init or random_teacher_start(args.out, args.teacher_shape, args.max_train)
    from motian.task_training import TaskTraining
    from motian.train.settings import OptimSettings, RunSettings

    common = dict(max_train=args.max_train, max_eval=args.max_eval, seeds=args.seeds,
                  run=RunSettings(progress=False))
    teacher = finetune("reviews-sentiment", args.out / "teacher", model=init,
                       tokenizer=args.tokenizer, max_length=args.max_length,
                       pooling=args.pooling, optim=OptimSettings(lr=args.teacher_lr),
                       training=TaskTraining(epochs=args.epochs, batch_size=args.batch_size),
                       **common)
    teacher_model = args.out / "teacher" / f"seed-{args.seeds[0]}" / "model"
    t_cfg = _config(teacher_model)
    result = distill(teacher_model, args.out / args.name, init=args.student_init,
                     student_layers=args.student_layers or max(1, t_cfg["layers"] // 2),
                     student_hidden=args.student_hidden or t_cfg["hidden"] // 2,
                     temperature=args.temperature, alpha_soft=args.alpha_soft,
                     alpha_hard=args.alpha_hard, alpha_hidden=args.alpha_hidden,
                     alpha_attention=args.alpha_attention, epochs=args.epochs,
                     batch_size=args.batch_size, optim=OptimSettings(lr=args.student_lr),
                     **common)
    print(f"\nreviews-sentiment, {result['task']['train_used']} training reviews, "
          f"student init {args.student_init}, weights {result['config']['weights']}, "
          f"{args.epochs:g} epochs, seeds {args.seeds}; teacher from "
          f"{args.init or 'random weights'}; student compute {result['compute_ratio']:.3f} × "
          f"the teacher's (encoder matmul FLOPs per token at length {args.max_length})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; load average before {load[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s\n")
    print(table(teacher, result))
    student_model = args.out / args.name / f"seed-{args.seeds[0]}" / "model"
    print(f"\nserving: .venv/bin/python benchmarks/serving.py --models tiny --threads 1 "
          f"--checkpoint {teacher_model} --checkpoint {student_model}")


def _config(model: Path) -> dict:
    return json.loads((model / "config.json").read_text("utf-8"))["model"]


if __name__ == "__main__":
    main()
