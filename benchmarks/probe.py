"""Linear probe: what does a pretrained encoder know about review sentiment before fine-tuning?

Fine-tuning scores mix two things: what the encoder brings and what 6,000 labels teach it in
one epoch. A probe separates them: the encoder is frozen, each review becomes one vector, and a
logistic regression (scikit-learn) is fitted on the training vectors and scored on the test
split. Two vectors per review: the last layer at [CLS] (what the classification head reads)
and the mean over the review's real tokens. Arms: the checkpoint and random initialisation of
the same shape (same tokenizer, same features), beside character TF-IDF on the same examples.

    python benchmarks/probe.py --init runs/demo/pretrain/final --max-train 6000

If the pretrained mean vector beats the random one by a wide margin while the [CLS] vectors
are both poor, the encoder learned sentiment-relevant features that the [CLS] head does not
reach; if neither beats random, pretraining did not learn them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from downstream import tfidf_accuracy  # the same baseline as benchmarks/downstream.py

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.finetuning import load_start, subset
from motian.model.artifact import find_tokenizer
from motian.model.heads import masked_mean
from motian.tasks.builtin import reviews_sentiment
from motian.tasks.features import Featurizer, collate


@torch.no_grad()
def embed(model: torch.nn.Module, features: list, pad: int, batch_size: int = 64
          ) -> dict[str, np.ndarray]:
    """{"cls": (N, hidden), "mean": (N, hidden)} from the frozen encoder's last layer."""
    model.eval()
    out: dict[str, list] = {"cls": [], "mean": []}
    for i in range(0, len(features), batch_size):
        batch = collate("single", features[i:i + batch_size], pad)
        h = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        out["cls"].append(h[:, 0].numpy())
        out["mean"].append(masked_mean(h, batch["attention_mask"]).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def probe(x_train: np.ndarray, y_train: list[int], x_test: np.ndarray, y_test: list[int]
          ) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=5000, C=1.0).fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == np.array(y_test)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="a motian checkpoint")
    parser.add_argument("--max-train", type=int, default=6000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="random initialisations for the control arm")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("scikit-learn is not installed: pip install scikit-learn (the dev extra has it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = reviews_sentiment()
    train, test = subset(task.splits["train"], args.max_train), task.splits["test"]
    tok = load_tokenizer(find_tokenizer(args.init))
    special = special_token_ids(tok)
    featurize = Featurizer(task, tok, special, args.max_length)
    f_train, f_test = featurize(train), featurize(test)
    y_train, y_test = [e.label for e in train], [e.label for e in test]
    rows = {}
    arms = [("pretrained", False, 0)] + [(f"random init (seed {s})", True, s) for s in args.seeds]
    for name, random_init, seed in arms:
        torch.manual_seed(seed)
        model, _, _ = load_start(task, args.init, "tiny", tok.get_vocab_size(), random_init)
        t0 = time.perf_counter()
        x_train, x_test = embed(model, f_train, special["pad"]), embed(model, f_test, special["pad"])
        rows[name] = {k: round(100 * probe(x_train[k], y_train, x_test[k], y_test), 2)
                      for k in ("cls", "mean")}
        print(f"{name}: [CLS] {rows[name]['cls']:.2f}, mean {rows[name]['mean']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows["TF-IDF char 1-2-gram + LR"] = {"text": round(100 * tfidf_accuracy(train, [test])[0],
                                                       2)}
    print(json.dumps({"init": str(args.init), "train": len(train), "test": len(test),
                      "test_accuracy": rows}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
