"""Generation speed: motian's decoder against transformers' `GPT2LMHeadModel` holding the same
weights, in one process, on the same prompts, side by side.

    nice -n 5 .venv/bin/python benchmarks/generate_speed.py                  # gpt-demo shape
    nice -n 5 .venv/bin/python benchmarks/generate_speed.py --checkpoint runs/gpt2/final
    .venv/bin/python benchmarks/generate_speed.py --layers 4 --hidden 256 --heads 8

The motian model is a GPT-2-shaped `CausalLM` (the gpt2-demo recipe's model: Pre-LN, learned
absolute positions, no embedding LayerNorm; `--layers/--hidden/--heads/--ffn` change its shape)
with random weights, or a trained checkpoint of that shape (`--checkpoint`). `motian.export_hf`
writes it as a native GPT-2 directory and `GPT2LMHeadModel.from_pretrained` loads it: the same
weights, and the export's own logits parity is checked here too.

Prompts: the starts of People's Daily (1998) paragraphs (bundled), of varied lengths, tokenised
by the demo tokenizer (`runs/demo/tokenizer`, else one trained here on the same text) and read
as `motian generate` reads a prompt: [CLS] + tokens; a batch is left-padded. Both sides decode
greedily for exactly `--new-tokens` tokens (no stop token, nothing banned), with and without
their KV cache, at each `--batch` size: motian through `motian.serving.generate.generate_ids`
(what `motian generate` runs), transformers through `generate()`. Each row is the median of
`--repeats` runs after one warm-up, the two libraries interleaved run by run so load from other
processes hits both alike; tokens/s = batch x new tokens / time. `--clock cpu` (the default)
times the process's CPU seconds, which other jobs on a shared machine do not inflate (one
thread each, so CPU time is the time on a core); `--clock wall` times the wall clock.

Random weights decode exactly as fast as trained ones; they are drawn wide (`--init-std`) so
greedy decoding does not just repeat one token and "same tokens" has something to compare (the
distinct tokens generated are printed). Rows are kept in `--out`/results.jsonl, keyed by the
settings and a fingerprint of the decoding code and library versions, so a rerun after a kill
or with more batch sizes redoes only what is missing or stale.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from motian.data.sources import pd98_paragraphs
from motian.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
from motian.model import CausalLM, from_pretrained
from motian.model.hf import export_hf, require_gpt2
from motian.serving.export import check_batches, check_hf, require_parity
from motian.serving.generate import Decoding, generate_ids, left_pad
from motian.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
# The files whose code runs while motian decodes: a change to them makes cached rows stale.
DECODING_CODE = ("motian/serving/generate.py", "motian/serving/prefix_decoding.py",
                 "motian/model/transformer.py", "motian/model/heads.py",
                 "motian/model/positions.py")


def prompt_texts(n: int, shortest: int = 8, longest: int = 40) -> list[str]:
    """The starts of `n` People's Daily paragraphs, from `shortest` to `longest` characters."""
    texts = []
    for _, _, pairs in itertools.islice(pd98_paragraphs(), 50, None, 37):
        text = "".join(w for w, _ in pairs)
        size = shortest + (len(texts) * 7) % (longest - shortest + 1)
        if len(text) >= size:
            texts.append(text[:size])
        if len(texts) == n:
            return texts
    raise RuntimeError("the bundled pd98 file has too few paragraphs")


def find_tokenizer_dir(root: Path) -> Path:
    """The demo tokenizer if `make demo` made one, else a WordPiece trained on pd98 here."""
    demo = ROOT / "runs/demo/tokenizer"
    if (demo / "tokenizer.json").is_file():
        return demo
    out = root / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        corpus = root / "pd98.txt"
        corpus.write_text("\n".join("".join(w for w, _ in pairs) for _, _, pairs in
                                    itertools.islice(pd98_paragraphs(), 3000)), encoding="utf-8")
        train_tokenizer([str(corpus)], out, vocab_size=3000, progress=False)
    return out


def random_model(tokenizer_dir: Path, layers: int, hidden: int, heads: int, ffn: int,
                 init_std: float, seed: int = 0) -> CausalLM:
    """gpt2-demo's model config at the given shape, random weights."""
    vocab = len(load_tokenizer(tokenizer_dir).get_vocab())
    config = load_recipe("gpt2-demo").model.build().replace(
        vocab_size=vocab, layers=layers, hidden=hidden, heads=heads, ffn=ffn,
        initializer_range=init_std)
    torch.manual_seed(seed)
    return CausalLM(config).eval()


def load_gpt2(model: CausalLM, directory: Path, tokenizer_dir: Path):
    """`model` exported as a native GPT-2 directory, loaded by transformers, logits checked."""
    from transformers import GenerationConfig, GPT2LMHeadModel

    require_gpt2(model)
    export_hf(model, directory, tokenizer_dir)
    parity = check_hf(model, directory, check_batches(model, tokenizer_dir))
    require_parity(parity, 1e-4, f"the GPT-2 export ({directory})")
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    # The exported generation_config.json decodes as `motian generate` does by default (stop
    # at [SEP], special tokens banned); transformers merges it into any config passed to
    # generate(), so it is dropped here: both sides decode plain greedy.
    hf.generation_config = GenerationConfig()
    return hf, parity.worst()


def motian_decode(model: CausalLM, rows: list[list[int]], new_tokens: int, cache: bool,
                  pad_id: int) -> list[list[int]]:
    return generate_ids(model, rows, Decoding(max_new_tokens=new_tokens, cache=cache),
                        pad_id).tokens


def hf_decode(hf, rows: list[list[int]], new_tokens: int, cache: bool,
              pad_id: int) -> list[list[int]]:
    from transformers import GenerationConfig

    ids, mask = left_pad(rows, pad_id, torch.device("cpu"))
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              use_cache=cache, pad_token_id=pad_id, eos_token_id=None)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1]:].tolist()


def timed(run: Callable[[], list[list[int]]], clock: str) -> tuple[float, list[list[int]]]:
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    tokens = run()
    return now() - start, tokens


def fingerprint() -> str:
    import transformers

    h = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for name in DECODING_CODE:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


def measure(model: CausalLM, hf, rows: list[list[int]], new_tokens: int, cache: bool,
            pad_id: int, repeats: int, clock: str) -> dict:
    """One (batch, cache) row: both libraries, interleaved, median seconds of `repeats`."""
    runs = {"motian": lambda: motian_decode(model, rows, new_tokens, cache, pad_id),
            "transformers": lambda: hf_decode(hf, rows, new_tokens, cache, pad_id)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens = {name: run() for name, run in runs.items()}  # warm-up, and the tokens compared
    for _ in range(repeats):
        for name, run in runs.items():
            s, _ = timed(run, clock)
            seconds[name].append(s)
    row = {"batch": len(rows), "cache": cache, "new_tokens": new_tokens,
           "same_tokens": tokens["motian"] == tokens["transformers"],
           "distinct_tokens": len({t for r in tokens["motian"] for t in r})}
    for name, values in seconds.items():
        row[f"{name}_tokens_per_s"] = len(rows) * new_tokens / statistics.median(values)
    row["ratio"] = row["motian_tokens_per_s"] / row["transformers_tokens_per_s"]
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a GPT-2-shaped motian CausalLM (e.g. the "
                   "final/ of recipe gpt2-demo); default: random weights")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=0, help="0: 4 x hidden")
    p.add_argument("--init-std", type=float, default=0.3, help="random weights ~ N(0, this)")
    p.add_argument("--tokenizer", type=Path, help="default: the checkpoint's, else the demo's")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs/generate_speed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        from motian.model.artifact import find_tokenizer

        model = from_pretrained(args.checkpoint).eval()
        tokenizer_dir = find_tokenizer(args.checkpoint, args.tokenizer)
        source = str(args.checkpoint)
    else:
        tokenizer_dir = args.tokenizer or find_tokenizer_dir(args.out)
        model = random_model(tokenizer_dir, args.layers, args.hidden, args.heads,
                             args.ffn or 4 * args.hidden, args.init_std)
        source = f"random weights ~ N(0, {args.init_std})"
    c = model.config
    hf, worst = load_gpt2(model, args.out / "gpt2", tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    special = special_token_ids(tok)
    texts = prompt_texts(max(args.batch))
    rows = [[special["cls"]] + tok.encode(t, add_special_tokens=False).ids for t in texts]
    if max(map(len, rows)) + args.new_tokens > c.max_positions:
        raise SystemExit(f"prompts of up to {max(map(len, rows))} tokens + {args.new_tokens} "
                         f"new ones exceed max_positions={c.max_positions}: ask for fewer")
    print(f"model: {c.layers} layers x {c.hidden} hidden, {c.heads} heads, ffn {c.ffn}, vocab "
          f"{c.vocab_size}, {source}; GPT-2 export logits max |diff| {worst:.1e}")
    print(f"prompts: {len(rows)} pd98 paragraph starts, {min(map(len, rows))}-"
          f"{max(map(len, rows))} tokens with [CLS]; {args.new_tokens} new tokens, greedy; "
          f"{args.clock} clock, {args.threads} thread(s), median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = args.out / "results.jsonl"
    known = {}
    if results.is_file():
        known = {r["key"]: r for r in map(json.loads, results.read_text().splitlines())}
    found = []
    for batch in args.batch:
        for cache in (True, False):
            key = json.dumps([source, c.to_dict(), str(tokenizer_dir), batch, cache,
                              args.new_tokens, args.repeats, args.clock, args.threads,
                              fingerprint()], sort_keys=True)
            row = known.get(key)
            if row is None:
                row = measure(model, hf, rows[:batch], args.new_tokens, cache, special["pad"],
                              args.repeats, args.clock) | {"key": key}
                with open(results, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            found.append(row)
    print_table(found)
    return found


def print_table(rows: list[dict]) -> None:
    print("\n| batch | KV cache | motian tokens/s | transformers tokens/s | motian / "
          "transformers | same greedy tokens | distinct tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {'yes' if r['cache'] else 'no'} | "
              f"{r['motian_tokens_per_s']:,.0f} | {r['transformers_tokens_per_s']:,.0f} | "
              f"{r['ratio']:.2f} | {'yes' if r['same_tokens'] else 'NO'} | "
              f"{r['distinct_tokens']} |")


if __name__ == "__main__":
    main()
