"""Pretraining numbers for docs/pretrain.md.

    python benchmarks/pretrain.py demo --data runs/demo/encoded --minutes 10 [--set optim.lr=0.002]
    python benchmarks/pretrain.py recompute
    python benchmarks/pretrain.py processes --data runs/demo/encoded

demo: trains a recipe (default `demo`) for a wall-clock budget and prints held-out masked-token
accuracy and loss before training (the step-0 evaluation, the same model untrained) and after,
under the common evaluation. `--set a.b=value` changes one recipe field (YAML syntax), which is
how each lever in docs/pretrain.md was measured.
recompute: activation memory (bytes autograd saves for backward, counted with
`saved_tensors_hooks`) and fwd+bwd time of the tiny preset with and without recomputation.
processes: optimizer steps per second of the same run on 1 process and on 2 (torchrun, gloo).
ngram: count-based references on the same common evaluation set, to read the neural numbers
against: the most frequent token, the most frequent token after the left neighbour, and the
most frequent token between the left and right neighbours (backing off to one side), all
counted on the training documents only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from motian.train.metrics import read_metrics
from motian.train.recipe import load_recipe, save_recipe, with_fields


def with_settings(recipe_name: str, sets: list[str]):
    """The recipe with `key.sub=value` overrides applied (`motian pretrain --override`)."""
    return with_fields(load_recipe(recipe_name), sets)


def demo(args) -> None:
    from motian.pretraining import pretrain_recipe
    from motian.train.recipe import RunSettings

    recipe = with_settings(args.recipe, args.set)
    # --steps: a fixed step count instead of the clock, so arms compare at equal work even when
    # the machine is shared; the CPU seconds used are printed next to it.
    recipe = (replace(recipe, budget_minutes=0.0, steps=args.steps) if args.steps
              else replace(recipe, budget_minutes=args.minutes))
    out = Path(args.out or tempfile.mkdtemp(prefix="motian-bench-"))
    if out.exists() and args.out:
        shutil.rmtree(out)
    started, cpu_started = time.time(), time.process_time()
    summary = pretrain_recipe(recipe, RunSettings(device="cpu", threads=args.threads,
                                                  progress=not args.quiet), Path(args.data), out)
    evals = read_metrics(out / "metrics.jsonl", "eval")
    train = read_metrics(out / "metrics.jsonl", "train")
    result = {"recipe": args.recipe, "set": args.set, "minutes": args.minutes,
              "steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
              "wall_s": round(time.time() - started, 1),
              "cpu_s": round(time.process_time() - cpu_started, 1),
              "untrained": evals[0] if evals and evals[0]["step"] == 0 else None,
              "final": summary["eval"],
              "train_tokens_per_s": round(sum(r["tokens_per_s"] for r in train[-5:])
                                          / max(len(train[-5:]), 1))}
    print(json.dumps(result, indent=1))


def recompute(args) -> None:
    from motian.model import MaskedLM, preset

    def measure(flag: bool) -> tuple[int, float]:
        torch.manual_seed(0)
        model = MaskedLM(preset("tiny", vocab_size=8000, checkpoint_activations=flag))
        ids = torch.randint(5, 8000, (args.batch, args.seq_len))
        positions = torch.randperm(args.batch * args.seq_len)[: args.batch * args.seq_len // 7]
        labels = ids.reshape(-1)[positions]
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        # What forward leaves for backward (the activation memory held between them); with
        # recomputation, backward briefly re-creates one block's activations on top of this.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, mlm_positions=positions, mlm_labels=labels).loss
        loss.backward()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(ids, mlm_positions=positions, mlm_labels=labels).loss.backward()
            times.append(time.perf_counter() - t0)
        return saved[0], sorted(times)[len(times) // 2]

    (mem0, t0), (mem1, t1) = measure(False), measure(True)
    print(json.dumps({"shape": f"tiny, batch {args.batch} x {args.seq_len}",
                      "saved_MB": {"plain": round(mem0 / 2**20, 2),
                                   "recompute": round(mem1 / 2**20, 2)},
                      "memory_saved": f"{1 - mem1 / mem0:.0%}",
                      "step_ms": {"plain": round(1e3 * t0, 1), "recompute": round(1e3 * t1, 1)},
                      "time_cost": f"{t1 / t0 - 1:+.0%}"}, indent=1))


def processes(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="motian-procs-"))
    # The first stage only (the demo's 90%): one --micro-batch must divide every stage's rows.
    base = load_recipe(args.recipe)
    recipe = replace(base, budget_minutes=0, steps=args.steps, checkpoint_every=0,
                     stages=(replace(base.stages[0], fraction=1.0),),
                     eval=replace(base.eval, every=0))
    save_recipe(recipe, tmp / "r.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "motian.cli", "pretrain", "--recipe", str(tmp / "r.yaml"), "--data",
              args.data, "--device", "cpu", "--no-progress", "--micro-batch",
              str(recipe.stages[0].global_batch // 2)]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    results = {}
    for n, cmd in ((1, [sys.executable, *common, "--threads", "2"]),
                   (2, [torchrun, "--standalone", "--nproc_per_node", "2", *common,
                        "--threads", "1"])):
        done = subprocess.run([*cmd, "--out", str(tmp / f"p{n}")], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{n} process(es) failed ({' '.join(cmd)}):\n{done.stderr[:3000]}")
        summary = json.loads((tmp / f"p{n}" / "summary.json").read_text())
        results[f"{n} process(es)"] = round(summary["steps"] / summary["seconds"], 2)
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "steps_per_s": results},
                     indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


def _argmax_by_context(context: np.ndarray, center: np.ndarray) -> dict[int, int]:
    """{context key: the centre token seen most often with it}, from aligned int64 arrays."""
    pairs, counts = np.unique(np.stack([context, center], 1), axis=0, return_counts=True)
    order = np.lexsort((-counts, pairs[:, 0]))  # by context, most frequent centre first
    pairs = pairs[order]
    first = np.ones(len(pairs), bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    return dict(zip(pairs[first, 0].tolist(), pairs[first, 1].tolist()))


def ngram(args) -> None:
    # Written here because it is a yardstick for the common evaluation (same held-out rows,
    # same masking, same neighbours the model sees), not a language model anyone should use.
    from motian.data.loader import LoaderConfig
    from motian.data.splits import SplitLoader
    from motian.pretraining import eval_batches

    data = Path(args.data)
    recipe = load_recipe(args.recipe)
    train = SplitLoader(data, LoaderConfig(seq_len=recipe.eval.seq_len, batch_size=1),
                        recipe.eval.holdout_every, held_out=False)
    vocab = len(train.vocab)
    docs = [np.asarray(train.shards[s].tokens[a:a + n], dtype=np.int64)
            for s, a, n in zip(train.doc_shard, train.doc_start, train.doc_len)]
    left = np.concatenate([d[:-2] for d in docs if len(d) > 2])
    mid = np.concatenate([d[1:-1] for d in docs if len(d) > 2])
    right = np.concatenate([d[2:] for d in docs if len(d) > 2])
    unigram = int(np.bincount(np.concatenate(docs), minlength=vocab).argmax())
    by_left = _argmax_by_context(left, mid)
    by_right = _argmax_by_context(right, mid)
    by_both = _argmax_by_context(left * vocab + right, mid)
    hits = {"most frequent token": 0, "left neighbour": 0, "left + right neighbours": 0}
    total = 0
    for batch in eval_batches(data, recipe.eval, causal=False)[0]:
        ids = batch["input_ids"]
        width = ids.shape[1]
        flat = ids.reshape(-1).tolist()
        for p, y in zip(batch["mlm_positions"].reshape(-1).tolist(),
                        batch["mlm_labels"].reshape(-1).tolist()):
            a = flat[p - 1] if p % width else None
            b = flat[p + 1] if (p + 1) % width else None
            guess_left = by_left.get(a, unigram)
            both = by_both.get(a * vocab + b) if a is not None and b is not None else None
            guess_both = both if both is not None else by_left.get(a, by_right.get(b, unigram))
            hits["most frequent token"] += unigram == y
            hits["left neighbour"] += guess_left == y
            hits["left + right neighbours"] += guess_both == y
            total += 1
    print(json.dumps({"data": str(data), "training_tokens": int(sum(map(len, docs))),
                      "masked_tokens": total,
                      "accuracy": {k: round(v / total, 4) for k, v in hits.items()}}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("demo")
    p.add_argument("--data", default="runs/demo/encoded")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("recompute")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("processes")
    p.add_argument("--data", default="runs/demo/encoded")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--steps", type=int, default=30)
    p = sub.add_parser("ngram")
    p.add_argument("--data", default="runs/demo/encoded")
    p.add_argument("--recipe", default="demo", help="whose common evaluation to use")
    args = parser.parse_args()
    {"demo": demo, "recompute": recompute, "processes": processes,
     "ngram": ngram}[args.what](args)


if __name__ == "__main__":
    main()
