"""Synonym replacement drawn by frequency vs uniformly (docs/batches.md, "Which synonym").

    python benchmarks/synonyms.py intrinsic --data runs/demo/encoded --batches 200
    python benchmarks/synonyms.py pretrain --data runs/demo/encoded --steps 300 --seeds 1 2 3 \
        --out runs/bench-synonyms

intrinsic: the `motian` masking preset over `--batches` batches (32 x 128) of the encoded
corpus, once per draw (uniform, and frequency weighting at each `--alphas`), all with the same
seed: the same words get a synonym in every arm (the draws use the generator alike), only the
candidate differs. Reported per arm: the mean log10(1 + corpus count) of the chosen synonyms,
the share of them that are rare in the corpus (fewer than `--rare` occurrences as a jieba word
of the encoded shards) or absent, how many distinct words were used, the mean effective number
of candidates (exp of the entropy of the draw) per replaced word, and the most chosen
replacements of the most often replaced words. The corpus counts are the encoded corpus' own
(jieba words of the shards), not jieba's dictionary counts the weights use.

pretrain: the demo model (motian/configs/demo.yaml) trained `--steps` steps with the `motian`
masking preset (no pair task), uniform vs frequency draw, one run per seed (model and data
seed alike), one thread each, one after the other. Each model is evaluated on the common
held-out evaluation (BERT token masking, as every recipe) and on held-out rows masked by the
motian preset itself, once with uniform and once with weighted synonyms (fixed seed). An arm
whose result.json exists is skipped, so a re-run resumes.

An encoded folder whose synonyms.npz predates the weights is used through a temporary copy
(links to its shards, a weighted table rebuilt with its tokenizer and checked to have the same
rows, so the shards' row numbers stay valid).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.data.loader import LoaderConfig  # noqa: E402
from motian.data.masking import SYNONYM, MaskingConfig, synonym_draw_key  # noqa: E402
from motian.data.shards import WORD_START, EncodedDataset  # noqa: E402
from motian.data.splits import SplitLoader  # noqa: E402
from motian.errors import UserError  # noqa: E402

# --------------------------------------------------------------------------- data


def weighted_data(data: Path, work: Path) -> Path:
    """`data` if its synonym table has weights; else a folder in `work` linking to its shards
    with a weighted table built from the same tokenizer (checked: identical rows)."""
    from motian.data.synonyms import build_synonym_table
    from motian.data.tokenizer import load_tokenizer

    dataset = EncodedDataset(data)
    old = dataset.synonyms()
    if old.weighted:
        return data
    settings = dataset.manifest.get("settings", {})
    tokenizer = Path(dataset.manifest.get("tokenizer") or data / "vocab.txt")
    if not tokenizer.exists():
        tokenizer = data / "vocab.txt"
    table, _ = build_synonym_table(load_tokenizer(tokenizer),
                                   min_chars=settings.get("synonym_min_chars") or 2)
    same = table.words == old.words and all(np.array_equal(getattr(table, k), getattr(old, k))
                                            for k in ("start", "count", "length", "tokens"))
    if not same:
        raise UserError(f"{data}: rebuilding its synonym table with {tokenizer} gives other rows "
                        "than its synonyms.npz; encode it again with this motian instead")
    out = work / "encoded"
    out.mkdir(parents=True, exist_ok=True)
    for f in data.iterdir():
        if f.name != "synonyms.npz" and not (out / f.name).exists():
            os.symlink(f.resolve(), out / f.name)
    table.save(out / "synonyms.npz")
    return out


def corpus_counts(dataset: EncodedDataset, max_len: int) -> dict[bytes, int]:
    """Occurrences of every jieba word (as its token ids) of the encoded shards, for words of
    at most `max_len` tokens; keys are `word_key` bytes."""
    counter: Counter[bytes] = Counter()
    for i in range(len(dataset)):
        shard = dataset.shard(i)
        starts = (np.asarray(shard.flags) & WORD_START) > 0
        doc_starts = np.asarray(shard.docs[:-1])
        starts[doc_starts[doc_starts < len(starts)]] = True  # a document starts a word
        pos = np.flatnonzero(starts)
        ends = np.append(pos[1:], len(starts))
        ends = np.minimum(ends, np.asarray(shard.docs)[np.searchsorted(shard.docs, pos, "right")])
        length = ends - pos
        keep = length <= max_len
        pos, length = pos[keep], length[keep]
        tokens = np.asarray(shard.tokens, dtype=np.int32)
        padded = np.full((len(pos), max_len), -1, np.int32)
        for k in range(max_len):
            m = length > k
            padded[m, k] = tokens[pos[m] + k]
        keys, counts = np.unique(padded.view(np.dtype((np.void, 4 * max_len))).ravel(),
                                 return_counts=True)
        for key, c in zip(keys, counts):
            counter[key.tobytes()] += int(c)
    return counter


def word_key(ids, max_len: int) -> bytes:
    padded = np.full(max_len, -1, np.int32)
    padded[: len(ids)] = ids
    return padded.tobytes()


# --------------------------------------------------------------------------- intrinsic


def arms(alphas: list[float]) -> dict[str, MaskingConfig]:
    motian = MaskingConfig.preset("motian")
    out = {"uniform": replace(motian, synonym_weighting="uniform")}
    for a in alphas:
        out[f"frequency a={a:g}"] = replace(motian, synonym_weighting="frequency",
                                            synonym_alpha=a)
    return out


def intrinsic(args) -> dict:
    data = weighted_data(Path(args.data), Path(tempfile.mkdtemp(prefix="motian-syn-")))
    dataset = EncodedDataset(data)
    table = dataset.synonyms()
    max_len = int(table.length.max())
    t0 = time.time()
    counts = corpus_counts(dataset, max_len)
    count_s = time.time() - t0
    tok_vocab = (data / "vocab.txt").read_text(encoding="utf-8").splitlines()

    def text(ids) -> str:
        return "".join(tok_vocab[i].removeprefix("##") for i in ids)

    # row of a word, from its own token ids (the batch does not carry the row)
    from motian.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data / "vocab.txt")
    own = tok.encode_batch(table.words, add_special_tokens=False)
    row_of = {}
    for r, e in enumerate(own):
        row_of.setdefault(word_key(e.ids, max_len), r)
    offsets = table.offsets()
    results = {}
    for name, cfg in arms(args.alphas).items():
        # The training documents pretraining reads (every 50th is held out). Also: over all
        # documents, the demo corpus' stream is 1 token past a whole number of 127-token rows,
        # so each epoch's last row is [CLS] [SEP] alone, which `Masker` does not handle yet.
        loader = SplitLoader(data, LoaderConfig(seq_len=128, batch_size=32, seed=args.seed,
                                                masking=cfg), 50, held_out=False)
        key = (synonym_draw_key(table, cfg.synonym_alpha)
               if cfg.synonym_weighting == "frequency" else None)
        chosen, originals, eff, picks = [], [], [], defaultdict(Counter)
        t0 = time.time()
        it = loader.iter_numpy()
        for _ in range(args.batches):
            arrays, m = next(it)
            acts, ws = m.actions.reshape(-1), m.word_starts.reshape(-1)
            orig, shown = arrays["tokens"].reshape(-1), m.input_ids.reshape(-1)
            for p in np.flatnonzero((acts == SYNONYM) & ws):
                q = p + 1
                while q < len(acts) and acts[q] == SYNONYM and not ws[q]:
                    q += 1
                o, s = orig[p:q], shown[p:q]
                chosen.append(counts.get(word_key(s, max_len), 0))
                originals.append(counts.get(word_key(o, max_len), 0))
                picks[text(o)][text(s)] += 1
                r = row_of.get(word_key(o, max_len))
                if r is not None:  # effective number of candidates of this draw
                    n, s0 = int(table.count[r]), int(offsets[r])
                    probs = (np.diff(np.concatenate([[0.0], key[s0: s0 + n] - r]))
                             if key is not None else np.full(n, 1 / n))
                    eff.append(float(np.exp(-(probs * np.log(probs)).sum())))
        chosen_a, orig_a = np.asarray(chosen), np.asarray(originals)
        results[name] = {
            "replacements": len(chosen),
            "mean_log10_count_chosen": round(float(np.log10(1 + chosen_a).mean()), 3),
            "mean_log10_count_original": round(float(np.log10(1 + orig_a).mean()), 3),
            "rare_share": round(float((chosen_a < args.rare).mean()), 4),
            "absent_share": round(float((chosen_a == 0).mean()), 4),
            "median_count_chosen": float(np.median(chosen_a)),
            "distinct_replacements": len({w for c in picks.values() for w in c}),
            "effective_candidates": round(float(np.mean(eff)), 2),
            "seconds": round(time.time() - t0, 1),
            "_picks": picks,
        }
    common = Counter({w: sum(c.values()) for w, c in results["uniform"]["_picks"].items()})
    examples = {}
    for word, _ in common.most_common(args.examples):
        examples[word] = {name: ", ".join(f"{w} {n}" for w, n in r["_picks"][word].most_common(4))
                          for name, r in results.items()}
        examples[word]["corpus count"] = counts.get(
            word_key(tok.encode(word, add_special_tokens=False).ids, max_len), 0)
    for r in results.values():
        del r["_picks"]
    return {"data": str(args.data), "batches": args.batches, "seed": args.seed,
            "rare_below": args.rare, "corpus_count_seconds": round(count_s, 1),
            "arms": results, "examples": examples}


# --------------------------------------------------------------------------- pretraining


# Student's t, 97.5% quantile, by degrees of freedom (a paired t-test over seeds at 5%).
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def pretrain(args) -> dict:
    import torch

    from benchmarks.pretrain import with_settings
    from motian.model.io import from_pretrained
    from motian.pretraining import pretrain_recipe
    from motian.train.distributed import DistInfo
    from motian.train.objectives import evaluate_lm
    from motian.train.recipe import RunSettings

    torch.set_num_threads(1)
    out = Path(args.out)
    data = weighted_data(Path(args.data), out / "data")
    evals = {}  # held-out rows masked by the motian preset, uniform and weighted synonyms
    for name, w in (("uniform", "uniform"), ("weighted", "frequency")):
        cfg = LoaderConfig(seq_len=128, batch_size=32, seed=1234, masking=MaskingConfig.preset(
            "motian", synonym_weighting=w, synonym_alpha=args.alpha))
        loader = SplitLoader(data, cfg, 50, held_out=True)
        it = iter(loader)
        evals[name] = [next(it) for _ in range(8)]
    runs = {}
    for weighting in ("uniform", "frequency"):
        for seed in args.seeds:
            slug = f"{weighting}-seed{seed}"
            run_dir = out / slug
            done = run_dir / "result.json"
            if done.is_file():
                runs[slug] = json.loads(done.read_text(encoding="utf-8"))
                continue
            sets = ["data.masking=motian", "data.pair_task=none", f"seed={seed}",
                    f"data.seed={seed}", "eval.every=0", "checkpoint_every=0",
                    f"data.masking_overrides={{synonym_weighting: {weighting}, "
                    f"synonym_alpha: {args.alpha:g}}}"]
            recipe = replace(with_settings("demo", sets), budget_minutes=0.0, steps=args.steps)
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            t0, c0 = time.time(), time.process_time()
            summary = pretrain_recipe(recipe, RunSettings(device="cpu", threads=1,
                                                          progress=False), data, run_dir)
            model = from_pretrained(run_dir / "final")
            result = {"steps": summary["steps"], "wall_s": round(time.time() - t0, 1),
                      "cpu_s": round(time.process_time() - c0, 1),
                      "common_eval": {k: summary["eval"][k] for k in ("loss", "accuracy")}}
            for name, batches in evals.items():
                e = evaluate_lm(model, batches, DistInfo(), contextlib.nullcontext())
                result[f"motian_eval_{name}"] = {k: e[k] for k in ("loss", "accuracy")}
            done.write_text(json.dumps(result, indent=1), encoding="utf-8")
            runs[slug] = result
            print(slug, json.dumps(result), flush=True)
    table = {}
    metrics = ["common_eval", "motian_eval_uniform", "motian_eval_weighted"]
    for metric in metrics:
        for key in ("loss", "accuracy"):
            per = {w: np.array([runs[f"{w}-seed{s}"][metric][key] for s in args.seeds])
                   for w in ("uniform", "frequency")}
            diff = per["frequency"] - per["uniform"]  # paired by seed
            n = len(diff)
            se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            table[f"{metric}.{key}"] = {
                "uniform": [round(float(per["uniform"].mean()), 4),
                            round(float(per["uniform"].std(ddof=1)), 4) if n > 1 else None],
                "frequency": [round(float(per["frequency"].mean()), 4),
                              round(float(per["frequency"].std(ddof=1)), 4) if n > 1 else None],
                "paired_diff": round(float(diff.mean()), 4),
                "paired_diff_se": round(se, 4),
                "t": round(float(diff.mean() / se), 2) if n > 1 else None,
                # beyond the seed noise: a paired t-test at 5%, two-sided (with 3 seeds
                # |t| must reach 4.30, not 2: two standard errors would be too lax)
                "clears_noise": bool(n > 1 and abs(diff.mean()) > T95.get(n - 1, 1.96) * se),
            }
    return {"data": str(args.data), "steps": args.steps, "seeds": args.seeds,
            "alpha": args.alpha, "runs": runs, "summary": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("intrinsic")
    a.add_argument("--data", default="runs/demo/encoded")
    a.add_argument("--batches", type=int, default=200)
    a.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--rare", type=int, default=5)
    a.add_argument("--examples", type=int, default=6)
    b = sub.add_parser("pretrain")
    b.add_argument("--data", default="runs/demo/encoded")
    b.add_argument("--steps", type=int, default=300)
    b.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    b.add_argument("--alpha", type=float, default=0.5)
    b.add_argument("--out", default="runs/bench-synonyms")
    for p in (a, b):
        p.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = intrinsic(args) if args.cmd == "intrinsic" else pretrain(args)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
