"""Does pretraining pay downstream? reviews-sentiment and pd98-ner fine-tuned from random
initialisation and from a pretrained motian checkpoint (same shape, same tokenizer, same
settings, same seeds), beside a classical baseline: character 1-2-gram TF-IDF + logistic
regression (scikit-learn) for the reviews.

    python benchmarks/downstream.py --model runs/pretrain/final --seeds 1 2 3 \
        --max-train 6000 --epochs 1 --out runs/downstream --report docs/downstream.md

Prints a Markdown table (mean ± std over seeds, dev and test) and appends it, with the command
line and the checkpoint's SHA-256, to --report. Every fine-tuning run is an ordinary
`motian finetune` run under --out, so a re-run resumes where it stopped.

A fair comparison needs the pretraining corpus to exclude the evaluation reviews: build it
without `motian.tasks.builtin.reviews_heldout_texts()` (this script checks how many held-out
reviews a given cleaned corpus contains when --corpus is given and says so in the report).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.tasks.builtin import reviews_heldout_texts, reviews_sentiment  # noqa: E402
from motian.tasks.finetune import finetune, subset  # noqa: E402
from motian.tasks.report import comparison_table  # noqa: E402

MAIN_METRIC = {"reviews-sentiment": "accuracy", "pd98-ner": "f1"}


def tfidf_baseline(max_train: int | None) -> list[tuple[str, str, str, list[float]]]:
    """Character 1-2-gram TF-IDF + logistic regression on the same training reviews."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        print("scikit-learn is not installed: pip install scikit-learn (the dev extra has it)",
              file=sys.stderr)
        return []
    task = reviews_sentiment()
    train = subset(task.splits["train"], max_train)
    vectoriser = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    x = vectoriser.fit_transform([e.text for e in train])
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(x, [e.label for e in train])
    rows = []
    for split in ("dev", "test"):
        examples = task.splits[split]
        pred = clf.predict(vectoriser.transform([e.text for e in examples]))
        acc = sum(int(p) == e.label for p, e in zip(pred, examples)) / len(examples)
        rows.append((f"TF-IDF char 1-2-gram + LR ({len(train)} train)", split, "accuracy",
                     [acc]))
    return rows


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


def run(args: argparse.Namespace) -> str:
    rows = tfidf_baseline(args.max_train) if "reviews-sentiment" in args.tasks else []
    sha = None
    for task in args.tasks:
        for arm, random_init in (("random init", True), ("pretrained", False)):
            t0 = time.perf_counter()
            result = finetune(task, args.out / f"{task}-{arm.replace(' ', '-')}",
                              model=args.model, tokenizer=args.tokenizer, seeds=args.seeds,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              max_train=args.max_train, max_eval=args.max_eval,
                              random_init=random_init, save_model=False, device=args.device,
                              progress=not args.quiet)
            sha = sha or result["model"].get("sha256")
            metric = MAIN_METRIC[task]
            for split in ("dev", "test"):
                values = [r[split][metric] for r in result["runs"] if split in r]
                rows.append((f"{task}: {arm}", split, metric, values))
            print(f"{task} {arm}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = ["", f"### Downstream: random init vs pretrained ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Checkpoint: {args.model} (sha256 {sha})", ""]
    if args.corpus:
        lines += [f"Contamination check: {contamination(args.corpus)}.", ""]
    lines += [comparison_table(rows), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="pretrained motian checkpoint")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--tasks", nargs="+", default=["reviews-sentiment", "pd98-ner"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-train", type=int, default=6000)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--device", default="auto")
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
