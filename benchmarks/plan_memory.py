"""`motian plan`'s memory model against measured peaks: real MLM training steps on this CPU.

    .venv/bin/python benchmarks/plan_memory.py            # the table in docs/scale.md
    .venv/bin/python benchmarks/plan_memory.py --quick    # one shape (tests/test_plan.py)
    .venv/bin/python benchmarks/plan_memory.py --text     # characters and bytes per token

Each shape trains a `MaskedLM` (the shape given, 4 heads per 256 hidden, FFN 4 x hidden, Pre-LN)
on the encoded demo corpus (runs/demo/encoded: People's Daily 1998 + reviews, BERT token
masking at 15%) with LAMB: two optimizer steps of two micro-batches each, forward, backward,
clipping and the optimizer step as `motian.train.fit` runs them, fp32, with and without
activation recomputation. The second micro-batch of a step runs with the first one's gradients
alive, as in every accumulating run, which is what the plan assumes.

Measured: the peak of the bytes torch's CPU allocator holds, from the profiler's memory events
(`torch.profiler.profile(profile_memory=True)`: every allocation and free reports the running
"Total Allocated"; the profiler starts before the model is built, so weights, gradients,
optimizer state, batches and activations are all in it). Not the resident set size: RSS moves
with malloc's arenas and pages the allocator keeps after a free, and on this shared machine
by several MB between identical runs; the allocator's own count is exact. torch has no CPU
`memory_stats()` to read instead (the CUDA caching allocator has one; on a GPU
`torch.cuda.max_memory_allocated()` is the same measurement).

Predicted: `motian.train.plan` at the same shape on device "cpu" (its attention storage for
CPU kernels), fp32, one process, gradients accumulating.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.model.config import preset
from motian.model.heads import MaskedLM
from motian.train.fit import optimizer_step
from motian.train.optim import build_optimizer
from motian.train.plan import (
    Widths,
    activation_bytes,
    attention_storage,
    parameter_counts,
    peak_bytes,
    weight_bytes,
)
from motian.train.recipe import ObjectiveSpec

DATA = Path("runs/demo/encoded")
# (hidden, layers, seq_len, micro-batch, position, dropout)
SHAPES = [(128, 2, 128, 8, "alibi", 0.0), (256, 4, 128, 8, "alibi", 0.0),
          (256, 4, 256, 4, "alibi", 0.0), (128, 2, 256, 16, "alibi", 0.0),
          (256, 4, 128, 8, "absolute", 0.1), (256, 4, 128, 8, "t5", 0.0)]
QUICK = [(128, 2, 128, 8, "alibi", 0.0)]


def model_config(hidden: int, layers: int, seq_len: int, position: str, dropout: float,
                 vocab_size: int, recompute: bool):
    return preset("tiny", hidden=hidden, layers=layers, heads=max(hidden // 64, 1),
                  ffn=4 * hidden, norm="pre", position=position, max_positions=seq_len,
                  dropout=dropout, attention_dropout=dropout, vocab_size=vocab_size,
                  layer_norm_eps=1e-6, checkpoint_activations=recompute)


def predicted(config, seq_len: int, micro: int, rate: float = 0.15) -> float:
    """`motian plan`'s peak for this shape: fp32, CPU kernels, one process, accumulating."""
    counts = parameter_counts(config, ObjectiveSpec(), "none")
    weights, extra = weight_bytes(counts, "ddp", 1, half=False, accumulating=True,
                                  fsdp_policy=False)
    act = activation_bytes(config, seq_len, Widths(), attention_storage(config, "cpu"), rate,
                           config.checkpoint_activations)
    return peak_bytes(weights, extra, act, micro)


def measured(config, seq_len: int, micro: int, data: Path = DATA) -> float:
    """Peak bytes held by torch's CPU allocator over two LAMB steps of two micro-batches."""
    loader = PackedLoader(data, None, LoaderConfig(seq_len=seq_len, batch_size=micro,
                                                   masking=MaskingConfig.preset("bert")))
    batches = iter(loader)
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = MaskedLM(config).train()
        optimizer = build_optimizer(model, "lamb", 1e-3)
        for _ in range(2):
            for _ in range(2):
                model(**next(batches)).loss.backward()
            optimizer_step(model, optimizer, 1.0)
    return allocated_peak(prof)


def allocated_peak(prof) -> float:
    """The peak bytes torch's CPU allocator held while `prof` (a finished
    `torch.profiler.profile(profile_memory=True)`) ran, above what it held when it started."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    # The running total is the process's: it starts from what earlier profiled runs left
    # uncounted (freed after their profiler stopped), so the peak is taken from this start.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


def compare(shapes, data: Path = DATA) -> list[dict]:
    vocab = len((data / "vocab.txt").read_text(encoding="utf-8").splitlines())
    rows = []
    for hidden, layers, seq_len, micro, position, dropout in shapes:
        for recompute in (False, True):
            config = model_config(hidden, layers, seq_len, position, dropout, vocab, recompute)
            real, plan = measured(config, seq_len, micro, data), predicted(config, seq_len, micro)
            rows.append({"hidden": hidden, "layers": layers, "seq_len": seq_len, "micro": micro,
                         "position": position, "dropout": dropout, "recompute": recompute,
                         "attention": attention_storage(config, "cpu"),
                         "measured_mib": real / 2**20, "predicted_mib": plan / 2**20,
                         "error": plan / real - 1})
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['hidden']} | {r['layers']} | {r['seq_len']} | {r['micro']} | "
            f"{r['position']} | {r['dropout']:g} | {r['attention']} | "
            f"{'on' if r['recompute'] else 'off'} | {r['measured_mib']:.1f} | "
            f"{r['predicted_mib']:.1f} | {r['error']:+.1%} |")


def text_bytes_per_token(tokenizer: Path = Path("runs/demo/tokenizer")) -> dict:
    """Characters and UTF-8 bytes per token of the bundled corpus under `tokenizer`."""
    from motian.data.sources import iter_documents
    from motian.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    out = {}
    for source in ("pd98", "reviews"):
        chars = size = tokens = 0
        for doc in iter_documents([source]):
            chars += len(doc.text)
            size += len(doc.text.encode("utf-8"))
            tokens += len(tok.encode(doc.text, add_special_tokens=False).ids)
        out[source] = {"chars": chars, "bytes": size, "tokens": tokens,
                       "chars_per_token": chars / tokens, "bytes_per_token": size / tokens}
    total = {k: sum(out[s][k] for s in out) for k in ("chars", "bytes", "tokens")}
    out["all"] = {**total, "chars_per_token": total["chars"] / total["tokens"],
                  "bytes_per_token": total["bytes"] / total["tokens"],
                  "tokens_per_tb": 1e12 * total["tokens"] / total["bytes"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--text", action="store_true", help="bytes per token of the corpus")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.text:
        print(json.dumps(text_bytes_per_token(), indent=2))
        return
    print("| hidden | layers | seq | micro | position | dropout | attention | recompute | "
          "measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = compare(QUICK if args.quick else SHAPES, args.data)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
