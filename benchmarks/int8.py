"""int8 dynamic quantisation: speed of PyTorch vs fp32 ONNX vs int8 ONNX at batch 1 and 32, and
per-tensor vs per-channel int8 on the task's test split, for one fine-tuned model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8.py                 # distilled student
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8.py \
        --model runs/demo/finetune-reviews-sentiment/seed-1/model          # its teacher

Each backend runs the same collated batches of bundled reviews (the test split's first texts,
padded to the batch's longest, at most the card's max_length) on one thread; the time is the
median of --repeats passes after one warm-up. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.finetuning import load_card_task
from motian.model.artifact import TaskCard
from motian.model.io import from_pretrained
from motian.serving.export import export, torch_outputs
from motian.serving.onnx import INT8_FILE, ONNX_FILE, onnx_session, run_session
from motian.serving.quantize import SessionModule, quantize_int8, task_scores
from motian.tasks.features import Featurizer, collate


def batches(model_dir: Path, card: TaskCard, size: int, count: int, names) -> list[dict]:
    task = load_card_task(card)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    special = special_token_ids(tok)
    examples = task.splits["test"][:size * count]
    features = Featurizer(task, tok, special, card.max_length)(examples)
    return [{k: v for k, v in collate(task.type, features[i:i + size], special["pad"]).items()
             if k in names} for i in range(0, len(features), size)]


def timed(run, data: list[dict], repeats: int) -> float:
    """Median seconds per example over `repeats` passes over `data` (one warm-up pass)."""
    for b in data:
        run(b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in data:
            run(b)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / sum(len(b["input_ids"]) for b in data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/distill/seed-1/model"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    card = TaskCard.read(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        manifest = export(args.model, out, int8=True)
        quantize_int8(out / ONNX_FILE, out / "model.int8pc.onnx", per_channel=True)
        model = from_pretrained(args.model).eval()
        names = manifest["inputs"]
        sessions = {"onnx fp32": onnx_session(out / ONNX_FILE, threads=1),
                    "onnx int8": onnx_session(out / INT8_FILE, threads=1)}
        runs = {"torch fp32": lambda b: torch_outputs(model, b)} | {
            k: (lambda b, s=s: run_session(s, b)) for k, s in sessions.items()}
        print(f"model {args.model}: {manifest['head']}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"model.onnx {(out / ONNX_FILE).stat().st_size / 1e6:.2f} MB, "
              f"model.int8.onnx {(out / INT8_FILE).stat().st_size / 1e6:.2f} MB")
        for size, count in ((1, 64), (32, 4)):
            data = batches(args.model, card, size, count, names)
            ms = {k: timed(run, data, args.repeats) * 1e3 for k, run in runs.items()}
            print(f"batch {size:2d}: " + ", ".join(f"{k} {v:.3f} ms/example"
                                                   for k, v in ms.items())
                  + f" | int8 vs fp32 onnx {ms['onnx fp32'] / ms['onnx int8']:.2f}x faster, "
                  f"int8 vs torch {ms['torch fp32'] / ms['onnx int8']:.2f}x faster")
        test = manifest["int8"].get("test")
        if test:
            task = load_card_task(card)
            examples = task.splits["test"][:test["examples"]]
            tok_dir = args.model / "tokenizer.json"
            per_channel = task_scores(SessionModule(out / "model.int8pc.onnx"), task, examples,
                                      tok_dir, card.max_length)[test["metric"]]
            print(f"{test['task']} test ({test['examples']} examples) {test['metric']}: fp32 "
                  f"{test['fp32'] * 100:.2f}, int8 per-tensor {test['int8'] * 100:.2f}, int8 "
                  f"per-channel {per_channel * 100:.2f}; max |logit diff| vs torch "
                  f"(per-tensor) {manifest['int8']['max_abs_diff']}")


if __name__ == "__main__":
    main()
