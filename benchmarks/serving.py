"""Serving speed: PyTorch vs onnxruntime on the same exported sequence classifiers, side by side.

    .venv/bin/python benchmarks/serving.py                      # tiny + small, random weights
    .venv/bin/python benchmarks/serving.py --models tiny --examples 100
    .venv/bin/python benchmarks/serving.py --checkpoint runs/x/model --checkpoint runs/y/model

For every model, `motian export` writes the serving directory (ONNX parity checked as usual),
then both backends run through `motian.serving.predict.load_predictor`, the path `motian predict`
serves with, on the same tokenised bundled reviews (one review per request, padded batches of
32 for throughput):

* latency per example at batch 1: p50 and p99 over `--examples` requests;
* throughput at batch 32: examples per second over the same reviews.

Both backends get the same number of threads, and the two run interleaved, batch by batch, so
load from other processes on a shared machine hits both alike; the load average is printed
before and after. Random weights time exactly like trained ones (no early exits anywhere).

A checkpoint fine-tuned on reviews-sentiment (its task.json says so) also gets its accuracy on
the whole test split from each backend. The rows are (model, threads, backend); the
teacher-vs-student comparison of the distillation work adds rows the same way (a teacher and
its student are two more `--checkpoint`s) and a compute column.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from motian.data.sources import iter_reviews
from motian.data.tokenizer import train_tokenizer
from motian.model import SequenceClassification, count_parameters, preset, save_pretrained
from motian.serving.export import export
from motian.serving.predict import iter_predictions, load_predictor
from motian.tasks.builtin import load_builtin
from motian.tasks.features import Featurizer, collate
from motian.tasks.types import Example, Task

BACKENDS = ("torch", "onnx")


def reviews(n: int, skip: int = 7) -> list[str]:
    """`n` bundled reviews spread over the file (varied lengths, both labels)."""
    return [t for t, _, _ in itertools.islice(iter_reviews(), 0, n * skip, skip)]


def build_models(names: list[str], root: Path, tokenizer: Path) -> dict[str, Path]:
    """Random-weight 2-label classifiers of the named presets, saved with the tokenizer."""
    vocab = sum(1 for _ in open(tokenizer / "vocab.txt", encoding="utf-8"))
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = SequenceClassification(preset(name, vocab_size=vocab), num_labels=2)
        directory = save_pretrained(model, root / f"ckpt-{name}")
        for f in ("vocab.txt", "tokenizer.json"):
            (directory / f).write_bytes((tokenizer / f).read_bytes())
        out[f"{name} ({count_parameters(model) / 1e6:.1f}M)"] = directory
    return out


def batches(predictor, texts: list[str], size: int, max_length: int) -> list[dict]:
    task = Task("serving", "single")
    features = Featurizer(task, predictor.tokenizer, predictor.special, max_length)(
        [Example(str(i), t) for i, t in enumerate(texts)])
    return [{k: v for k, v in collate("single", features[i:i + size],
                                      predictor.special["pad"]).items()
             if k in predictor.input_names} for i in range(0, len(features), size)]


def accuracy(predictor) -> float | None:
    """Accuracy on the whole reviews-sentiment test split (1,776 reviews, sorted by label, so
    no prefix of it is a fair sample) for a model fine-tuned on that task (its task.json says
    so); None for any other model."""
    if predictor.task.get("name") != "reviews-sentiment":
        return None
    task = load_builtin("reviews-sentiment")
    test = task.splits["test"]
    out = iter_predictions(predictor, ((e.guid, {"text": e.text}) for e in test))
    return sum(o["label"] == task.labels[e.label] for o, e in zip(out, test)) / len(test)


def measure(serving: Path, texts: list[str], threads: int, max_length: int) -> dict:
    """{backend: {p50_ms, p99_ms, throughput}} for one exported model at `threads` threads."""
    torch.set_num_threads(threads)
    predictors = {b: load_predictor(serving, b, threads=threads) for b in BACKENDS}
    one = batches(predictors["torch"], texts, 1, max_length)
    many = batches(predictors["torch"], texts, 32, max_length)
    for p in predictors.values():  # warm-up: first calls allocate and plan
        for b in one[:5] + many[:1]:
            p.run(b)
    latency: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for b in one:
        for name, p in predictors.items():
            start = time.perf_counter()
            p.run(b)
            latency[name].append(time.perf_counter() - start)
    busy: dict[str, float] = {b: 0.0 for b in BACKENDS}
    for b in many:
        for name, p in predictors.items():
            start = time.perf_counter()
            p.run(b)
            busy[name] += time.perf_counter() - start
    return {name: {"p50_ms": 1e3 * statistics.median(latency[name]),
                   "p99_ms": 1e3 * float(np.percentile(latency[name], 99)),
                   "throughput": len(texts) / busy[name],
                   "accuracy": accuracy(predictors[name])}
            for name in BACKENDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--checkpoint", action="append", type=Path, default=[],
                        help="a motian checkpoint (with its tokenizer) to time as well")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()],
                        help="thread counts to time (both backends get the same)")
    args = parser.parse_args()
    texts = reviews(args.examples)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_tokenizer([_corpus(root)], root / "tok", vocab_size=8000, progress=False)
        models = build_models(args.models, root, root / "tok")
        models |= {str(c): c for c in args.checkpoint}
        rows = []
        for i, (name, ckpt) in enumerate(models.items()):
            export(ckpt, root / f"serve-{i}", format="onnx")
            for threads in dict.fromkeys(args.threads):
                rows.append((name, threads, measure(root / f"serve-{i}", texts, threads,
                                                    args.max_length)))
    print_table(rows, args, load)


def _corpus(root: Path) -> str:
    path = root / "reviews.txt"
    path.write_text("\n".join(reviews(6000, skip=5)) + "\n", encoding="utf-8")
    return str(path)


def print_table(rows: list, args, load: tuple[float, ...]) -> None:
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"onnxruntime {_ort_version()}; torch {torch.__version__}; load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{args.examples} bundled reviews, max_length {args.max_length}\n")
    print("| model | threads | backend | p50 ms (batch 1) | p99 ms (batch 1) | "
          "examples/s (batch 32) | reviews-sentiment test acc. |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, threads, result in rows:
        for backend, r in result.items():
            acc = "—" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
            print(f"| {name} | {threads} | {backend} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['throughput']:.0f} | {acc} |")
    print("\nonnxruntime vs PyTorch (p50 latency ratio torch/onnx, throughput ratio onnx/torch):")
    for name, threads, r in rows:
        print(f"  {name}, {threads} thread(s): latency {r['torch']['p50_ms'] / r['onnx']['p50_ms']:.2f}x, "
              f"throughput {r['onnx']['throughput'] / r['torch']['throughput']:.2f}x")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
