"""Does pretraining pay downstream? reviews-sentiment and pd98-ner fine-tuned (a) from random
initialisation, (b) from a pretrained motian checkpoint (same shape, tokenizer, settings, seeds)
and, when `transformers` is installed, (c) from a Hugging Face `BertForMaskedLM` of the same
shape pretrained by transformers' own MLM recipe for the same wall-clock budget on the same
encoded corpus (then read by motian's BERT import, as `motian finetune --model HF_DIR` does),
beside a classical baseline: character 1-2-gram TF-IDF + logistic regression (scikit-learn).

    python benchmarks/downstream.py --init runs/demo/pretrain/final --seeds 1 2 3 \
        --max-train 6000 --epochs 1 --hf-minutes 5 --out runs/downstream --report docs/finetune.md

The tokenizer is the checkpoint's own (found by `motian finetune`); arm (c) trains on the
encoded data the checkpoint's run.json names (or --data). Prints a Markdown table (mean ± std
over seeds, dev and test) and appends it, with the command line and the checkpoint's SHA-256,
to --report. Every fine-tuning run is an ordinary `motian finetune` run under --out, so a
re-run resumes where it stopped; arm (c)'s pretrained model is kept in --out/hf-bert.

`motian prepare` / `motian demo` leave the bundled tasks' dev/test texts out of the corpus;
--corpus counts held-out reviews in a cleaned corpus, to check one made otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.finetuning import finetune, subset  # noqa: E402
from motian.model.artifact import find_tokenizer  # noqa: E402
from motian.pipeline import FINETUNE_BATCH, FINETUNE_EPOCHS, FINETUNE_OPTIM  # noqa: E402
from motian.reporting.tables import comparison_table  # noqa: E402
from motian.task_training import TaskTraining  # noqa: E402
from motian.tasks.builtin import reviews_heldout_texts, reviews_sentiment  # noqa: E402
from motian.train.settings import OptimSettings, RunSettings  # noqa: E402

MAIN_METRIC = {"reviews-sentiment": "accuracy", "pd98-ner": "f1"}


def tfidf_baseline(max_train: int | None) -> list[tuple[str, str, str, list[float]]]:
    """Character 1-2-gram TF-IDF + logistic regression on the same training reviews."""
    if importlib.util.find_spec("sklearn") is None:
        print("scikit-learn is not installed: pip install scikit-learn (the dev extra has it)",
              file=sys.stderr)
        return []
    task = reviews_sentiment()
    train = subset(task.splits["train"], max_train)
    scores = tfidf_accuracy(train, [task.splits["dev"], task.splits["test"]])
    return [(f"TF-IDF char 1-2-gram + LR ({len(train)} train)", split, "accuracy", [acc])
            for split, acc in zip(("dev", "test"), scores)]


def tfidf_accuracy(train: list, evaluations: list[list]) -> list[float]:
    """Character 1-2-gram TF-IDF + logistic regression fitted on `train` examples; accuracy on
    each list of `evaluations`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectoriser = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    x = vectoriser.fit_transform([e.text for e in train])
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(x, [e.label for e in train])
    scores = []
    for examples in evaluations:
        pred = clf.predict(vectoriser.transform([e.text for e in examples]))
        scores.append(sum(int(p) == e.label for p, e in zip(pred, examples)) / len(examples))
    return scores


def contamination(corpus: Path) -> str:
    """How many held-out (dev/test) reviews occur verbatim as lines of a cleaned corpus."""
    held = reviews_heldout_texts()
    found = set()
    for path in sorted(corpus.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line).get("text", "")
                found.update(t for t in text.split("\n") if t.strip() in held)
    return f"{len(found)} of {len(held)} held-out reviews occur in the pretraining corpus {corpus}"


# --------------------------------------------------------------------------- arm (c)


def hf_blocks(data: Path, vocab: dict[str, int], seq_len: int) -> list[list[int]]:
    """run_mlm.py's `group_texts` on the encoded shards: every document as [CLS] doc [SEP],
    concatenated and cut into blocks of `seq_len` tokens (the remainder dropped)."""
    from motian.data.shards import EncodedDataset

    dataset = EncodedDataset(data, vocab_file=data / "vocab.txt")
    stream: list[int] = []
    for i in range(len(dataset)):
        shard = dataset.shard(i)
        docs = np.asarray(shard.docs)
        tokens = np.asarray(shard.tokens, dtype=np.int64)
        for a, b in zip(docs[:-1], docs[1:]):
            stream += [vocab["[CLS]"], *tokens[a:b].tolist(), vocab["[SEP]"]]
    n = len(stream) // seq_len
    return [stream[k * seq_len:(k + 1) * seq_len] for k in range(n)]


def hf_bert_arm(init: Path, data: Path, out: Path, minutes: float, batch_size: int, lr: float,
                seq_len: int = 128, seed: int = 0) -> Path:
    """Pretrain a `BertForMaskedLM` shaped like the motian checkpoint `init` with transformers'
    MLM recipe (run_mlm.py's pieces without `Trainer`, which needs `accelerate`):
    DataCollatorForLanguageModeling at 15% (80/10/10), AdamW (weight decay 0.01 except biases
    and LayerNorm), linear warm-up over 6% then linear decay, gradient clipping at 1.0, for
    `minutes` of wall clock (steps estimated from three timed steps). Saves the model and the
    vocabulary to `out` and returns it."""
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertTokenizerFast,
        DataCollatorForLanguageModeling,
        get_linear_schedule_with_warmup,
    )

    if (out / "config.json").is_file():
        print(f"arm (c): reusing {out}", file=sys.stderr)
        return out
    m = json.loads((init / "config.json").read_text("utf-8"))["model"]
    config = BertConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden"],
                        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                        intermediate_size=m["ffn"], max_position_embeddings=m["max_positions"],
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    tokenizer = BertTokenizerFast(vocab_file=str(data / "vocab.txt"))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    blocks = hf_blocks(data, tokenizer.get_vocab(), seq_len)
    order = np.random.default_rng(seed).permutation(len(blocks))

    def batch(step: int) -> dict:
        rows = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        return collator([{"input_ids": blocks[r]} for r in rows])

    def build() -> tuple:
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
        decay = [p for n, p in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
        rest = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
        return model, torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                         {"params": rest, "weight_decay": 0.0}], lr=lr)

    def step(model, optimizer, scheduler, k: int) -> float:
        loss = model(**batch(k)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    model, optimizer = build()  # three timed steps on a throwaway copy size the schedule
    probe = get_linear_schedule_with_warmup(optimizer, 0, 10)
    step(model, optimizer, probe, 0)
    t0 = time.perf_counter()
    for k in range(1, 4):
        step(model, optimizer, probe, k)
    total = max(10, int(minutes * 60 / ((time.perf_counter() - t0) / 3)))
    model, optimizer = build()
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * total), total)
    model.train()
    t0, loss, k = time.perf_counter(), math.nan, 0
    while k < total and time.perf_counter() - t0 < minutes * 60:
        loss = step(model, optimizer, scheduler, k)
        k += 1
        if k % 100 == 0:
            print(f"arm (c): step {k}/{total}, loss {loss:.3f}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copyfile(data / "vocab.txt", out / "vocab.txt")
    (out / "pretraining.json").write_text(json.dumps(
        {"steps": k, "planned_steps": total, "seconds": round(time.perf_counter() - t0, 1),
         "final_loss": loss, "batch_size": batch_size, "lr": lr, "seq_len": seq_len,
         "blocks": len(blocks)}, indent=1), "utf-8")
    print(f"arm (c): {k} steps in {time.perf_counter() - t0:.0f} s, loss {loss:.3f}",
          file=sys.stderr)
    return out


def data_of(init: Path) -> Path:
    """The encoded data the checkpoint was pretrained on, from its run's run.json."""
    for run_dir in Path(init).resolve().parents[:2]:
        if (run_dir / "run.json").is_file():
            data = json.loads((run_dir / "run.json").read_text("utf-8")).get("data")
            if data:
                return Path(data)
    sys.exit(f"{init}: no run.json with the pretraining data above it; pass --data")


# --------------------------------------------------------------------------- the benchmark


def run(args: argparse.Namespace) -> str:
    rows = tfidf_baseline(args.max_train) if "reviews-sentiment" in args.tasks else []
    arms: list[tuple[str, Path | None, bool]] = [("random init", args.init, True),
                                                 ("pretrained", args.init, False)]
    if args.hf_minutes > 0 and importlib.util.find_spec("transformers") is not None:
        data = args.data or data_of(args.init)
        hf = hf_bert_arm(args.init, data, args.out / "hf-bert", args.hf_minutes,
                         args.hf_batch_size, args.hf_lr)
        arms.append((f"HF BERT, run_mlm recipe, {args.hf_minutes:g} min", hf, False))
    elif args.hf_minutes > 0:
        print("transformers is not installed: arm (c) skipped (pip install transformers)",
              file=sys.stderr)
    sha = None
    for task in args.tasks:
        for arm, model, random_init in arms:
            t0 = time.perf_counter()
            result = finetune(task, args.out / f"{task}-{arm.split(',')[0].replace(' ', '-')}",
                              model=model, seeds=args.seeds, max_train=args.max_train,
                              max_eval=args.max_eval, random_init=random_init, save_model=False,
                              pooling=args.pooling, dropout=args.dropout,
                              training=TaskTraining(epochs=args.epochs,
                                                    batch_size=args.batch_size),
                              optim=OptimSettings(lr=args.lr),
                              run=RunSettings(device=args.device, progress=not args.quiet))
            if arm == "pretrained":
                sha = result["model"].get("sha256")
            metric = MAIN_METRIC[task]
            for split in ("dev", "test"):
                values = [r[split][metric] for r in result["runs"] if split in r]
                rows.append((f"{task}: {arm}", split, metric, values))
            print(f"{task} {arm}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = ["", f"### Downstream: random init vs pretrained ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Checkpoint: {args.init} (sha256 {sha}); tokenizer "
             f"{find_tokenizer(args.init)}", ""]
    if args.corpus:
        lines += [f"Contamination check: {contamination(args.corpus)}.", ""]
    lines += [comparison_table(rows), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", type=Path, required=True,
                   help="pretrained motian checkpoint, e.g. runs/demo/pretrain/final")
    p.add_argument("--tasks", nargs="+", default=["reviews-sentiment", "pd98-ner"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=float, default=FINETUNE_EPOCHS)
    p.add_argument("--batch-size", type=int, default=FINETUNE_BATCH)
    p.add_argument("--lr", type=float, default=FINETUNE_OPTIM.lr)
    p.add_argument("--hf-minutes", type=float, default=0.0,
                   help="arm (c): minutes of HF BERT pretraining (the motian run's budget for a "
                        "like-for-like comparison); 0 = skip the arm")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--hf-lr", type=float, default=1e-3)
    p.add_argument("--data", type=Path, default=None,
                   help="arm (c)'s encoded corpus (default: the one the checkpoint's run used)")
    p.add_argument("--max-train", type=int, default=6000)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dropout", type=float, default=None,
                   help="fine-tuning dropout (default: the model's own)")
    p.add_argument("--pooling", choices=["cls", "mean"], default=None,
                   help="what the classification head reads (default: chosen for the "
                        "checkpoint as motian finetune does: mean for MLM-only models)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="the cleaned pretraining corpus, to count held-out reviews in it")
    p.add_argument("--out", type=Path, default=Path("runs/downstream"))
    p.add_argument("--report", type=Path, default=None, help="append the table to this file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    table = run(args)
    print(table)
    if args.report:
        with open(args.report, "a", encoding="utf-8") as f:
            f.write(table)


if __name__ == "__main__":
    main()
