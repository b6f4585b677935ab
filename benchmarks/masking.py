"""Benchmark: motian's whole-word masking against Hugging Face's, and against a model step.

Side by side in one run, on the same real 128-token sequences of People's Daily 1998 with the
same vocabulary:

* **peer**: transformers 4.x ``DataCollatorForWholeWordMask`` (the Chinese whole-word masking
  of HF's examples), fed ``input_ids`` plus ``chinese_ref`` computed with jieba the way HF's
  ``run_chinese_ref.py`` does with LTP: segment, keep multi-character Chinese words, mark
  every non-initial character of such a word as a sub-word. Timed separately: the collator
  alone, and computing ``chinese_ref``;
* **motian**: ``PackedLoader`` with whole-word masking (reads the memory-mapped shards, packs,
  masks, makes torch tensors: everything a training step receives), and the masking alone;
* **model**: one training step (forward, backward, AdamW) of motian's ``tiny`` MaskedLM on the
  same batches, to show the loader's share of a step.

Run: ``.venv/bin/python benchmarks/masking.py`` (encodes the first 600 pd98 articles into a
temporary directory first; ``--data DIR`` reuses an encoded directory). Prints examples/s and
the ratios; numbers go to docs/batches.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig


def encode_pd98(work: Path, n_docs: int) -> Path:
    from motian.data.encode import encode
    from motian.data.sources import iter_documents
    from motian.data.tokenizer import train_tokenizer

    corpus = work / "pd98.txt"
    docs = itertools.islice(iter_documents(["pd98"]), n_docs)
    corpus.write_text("\n\n".join(d.text for d in docs) + "\n", encoding="utf-8")
    train_tokenizer([str(corpus)], work / "tok", vocab_size=8000, txt_mode="blank",
                    progress=False)
    encode([str(corpus)], work / "enc", tokenizer=work / "tok", workers=1, txt_mode="blank",
           progress=False)
    return work / "enc"


def real_rows(data: Path, n: int, seq_len: int) -> np.ndarray:
    """`n` packed rows without padding (the HF collator would treat [PAD] as words)."""
    loader = PackedLoader(data, config=LoaderConfig(seq_len=seq_len, batch_size=64))
    rows = []
    for arrays, _ in loader.iter_numpy():
        rows.extend(r for r, m in zip(arrays["tokens"], arrays["attention_mask"]) if m.all())
        if len(rows) >= n:
            return np.stack(rows[:n])
    raise SystemExit("not enough data")


def chinese_ref(tokens: list[str], cut) -> list[int]:
    """HF's run_chinese_ref.py logic with jieba for LTP: positions of tokens that continue a
    multi-character Chinese word (found by longest match of the segmenter's words)."""
    text = "".join(t for t in tokens if not t.startswith("["))
    words = {w for w in cut(text) if len(w) > 1 and all("\u4e00" <= c <= "\u9fff" for c in w)}
    longest = max(map(len, words), default=1)
    ref, i = [], 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 1, -1):
            if "".join(tokens[i: i + n]) in words:
                ref.extend(range(i + 1, i + n))
                i += n
                break
        else:
            i += 1
    return ref


def rate(fn, n_examples: int, repeat: int = 3) -> float:
    """Examples per second: best of `repeat` runs of fn() (which handles n_examples)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_examples / best


def bench_peer(rows: np.ndarray, vocab_file: Path, batch: int) -> tuple[float, float]:
    import jieba
    from transformers import BertTokenizerFast, DataCollatorForWholeWordMask
    from transformers import __version__ as hf_version

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    token_rows = [tok.convert_ids_to_tokens(r.tolist()) for r in rows]
    refs = []
    ref_rate = rate(lambda: refs.__setitem__(slice(None), [chinese_ref(t, jieba.lcut)
                                                          for t in token_rows]), len(rows), 1)
    examples = [{"input_ids": r.tolist(), "chinese_ref": ref} for r, ref in zip(rows, refs)]
    collator = DataCollatorForWholeWordMask(tok, mlm_probability=0.15, return_tensors="pt")

    def run():
        for i in range(0, len(examples) - batch + 1, batch):
            collator(examples[i: i + batch])

    n = len(examples) // batch * batch
    print(f"  peer: transformers {hf_version} DataCollatorForWholeWordMask, fast tokenizer")
    return rate(run, n), ref_rate


def bench_motian(data: Path, batch: int, seq_len: int, steps: int,
                 preset: str = "wwm") -> tuple[float, float, PackedLoader]:
    """(loader examples/s, masking-only examples/s, the loader)."""
    cfg = LoaderConfig(seq_len=seq_len, batch_size=batch, masking=MaskingConfig.preset(preset))
    loader = PackedLoader(data, config=cfg)
    it = iter(loader)
    next(it)  # first touch of the memory maps
    loader_rate = rate(lambda: list(itertools.islice(it, steps)), steps * batch)
    # Masking alone, on pre-assembled rows: the part the HF collator does.
    plan = loader._plan(loader.epoch)
    raw = [loader._packed_rows(plan, plan.row_order[i * batch:(i + 1) * batch])
           for i in range(steps)]
    rng = np.random.default_rng(0)

    def mask_only():
        for a in raw:
            loader.masker(a["tokens"], a["flags"] & 1 > 0, a["content"], a["synonyms"], rng)

    return loader_rate, rate(mask_only, steps * batch), loader


def bench_presets(data: Path, batch: int, steps: int) -> dict[str, float]:
    """Loader ms per batch for every masking preset at L=128 and L=512."""
    out = {}
    for name in ("bert", "wwm", "spanbert", "motian"):
        for seq_len in (128, 512):
            loader_rate, _, _ = bench_motian(data, batch, seq_len, steps, name)
            out[f"{name}@{seq_len}"] = round(batch / loader_rate * 1e3, 3)
    return out


def bench_model_step(loader: PackedLoader, steps: int) -> float:
    """Median seconds of a tiny-model training step on the loader's batches."""
    from motian.model.config import preset
    from motian.model.heads import MaskedLM

    torch.manual_seed(0)
    model = MaskedLM(preset("tiny", vocab_size=len(loader.vocab),
                            max_positions=loader.config.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = list(itertools.islice(iter(loader), steps + 3))
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an encoded directory (default: encode pd98)")
    p.add_argument("--docs", type=int, default=600, help="pd98 articles to encode")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="batches timed for motian")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or encode_pd98(Path(tmp), args.docs)
        rows = real_rows(data, args.examples, args.seq_len)
        print(f"{len(rows)} real {args.seq_len}-token examples, batch {args.batch}; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}")
        peer, ref = bench_peer(rows, data / "vocab.txt", args.batch)
        loader_rate, mask_rate, loader = bench_motian(data, args.batch, args.seq_len,
                                                      args.steps)
        step = bench_model_step(loader, 10)
        presets = bench_presets(data, args.batch, 30)
    loader_s = args.batch / loader_rate
    results = {
        "hf_collator_examples_per_s": round(peer), "hf_chinese_ref_jieba_examples_per_s":
        round(ref), "motian_loader_examples_per_s": round(loader_rate),
        "motian_masking_only_examples_per_s": round(mask_rate),
        "loader_vs_collator": round(loader_rate / peer, 1),
        "masking_vs_collator": round(mask_rate / peer, 1),
        "loader_vs_collator_plus_ref": round(loader_rate / (1 / (1 / peer + 1 / ref)), 1),
        "tiny_model_step_ms": round(step * 1e3, 2), "loader_ms_per_batch": round(loader_s * 1e3,
                                                                                  3),
        "loader_share_of_step_pct": round(100 * loader_s / step, 2),
        "loader_ms_per_batch_by_preset": presets,
    }
    print(f"  HF collator alone            {peer:10,.0f} examples/s")
    print(f"  HF chinese_ref (jieba)       {ref:10,.0f} examples/s")
    print(f"  motian loader (wwm, all in)  {loader_rate:10,.0f} examples/s   "
          f"{results['loader_vs_collator']}x the collator alone, "
          f"{results['loader_vs_collator_plus_ref']}x collator + chinese_ref")
    print(f"  motian masking alone         {mask_rate:10,.0f} examples/s   "
          f"{results['masking_vs_collator']}x the collator alone")
    print(f"  tiny model step {step * 1e3:.1f} ms; loader {loader_s * 1e3:.2f} ms per batch = "
          f"{results['loader_share_of_step_pct']}% of a step")
    print("  loader ms per batch of {}: {}".format(
        args.batch, ", ".join(f"{k} {v}" for k, v in presets.items())))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
