"""Entity masking (ERNIE 1.0) vs whole-word vs token masking, judged by pd98-ner after
pretraining for equal minutes.

    python benchmarks/entity_masking.py --out runs/entity_masking --minutes 10 --arm entity
    python benchmarks/entity_masking.py --out runs/entity_masking --minutes 10 --arm whole-word
    python benchmarks/entity_masking.py --out runs/entity_masking --minutes 10 --arm token
    python benchmarks/entity_masking.py --out runs/entity_masking --arm table

Every arm pretrains the ernie-demo recipe (demo.yaml's model, optimiser and stages) on the
same shards, changing only `data.masking`:

- entity: the ernie preset (a third of the picked units are People's Daily entities, nr/ns/nt
  with surname + given name as one; the rest words and 2-4-word phrases);
- whole-word: wwm (whole jieba words);
- token: bert (single tokens).

The corpus is the pd98-ner *training* articles only (article index mod 10 not 8 or 9, the
split `motian.tasks.builtin.pd98_split` gives the task), written as the tagger output they are
(word/TAG, one article per line) and encoded once with `--entities tags`: the NER dev and test
articles' text is never pretrained on, and the three arms read identical shards (the token and
whole-word arms ignore the entity marks). The minutes are CPU seconds of the training process
(`budget_clock: cpu`), so arms compare at equal work on a shared machine. Each arm then
fine-tunes pd98-ner (`--seeds`, `--max-train` examples) and appends its dev/test entity F1 to
--out/results.jsonl; `--arm table` prints them side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.data.encode import encode  # noqa: E402
from motian.data.sources import pd98_paragraphs  # noqa: E402
from motian.finetuning import finetune  # noqa: E402
from motian.pretraining import pretrain_recipe  # noqa: E402
from motian.task_training import TaskTraining  # noqa: E402
from motian.tasks.builtin import pd98_split  # noqa: E402
from motian.train.recipe import load_recipe, with_fields, with_overrides  # noqa: E402
from motian.train.settings import RunSettings  # noqa: E402

MASKING = {"entity": "ernie", "whole-word": "wwm", "token": "bert"}


def tagged_corpus(out: Path, articles: int) -> Path:
    """out/pd98-train-tagged.txt: the training articles of pd98-ner (the first `articles` of
    them; 0 = all), one per line as word/TAG tokens."""
    path = out / "pd98-train-tagged.txt"
    lines: dict[int, list[str]] = {}
    for article, _line, pairs in pd98_paragraphs():
        if pd98_split(article) != "train":
            continue
        if articles and article not in lines and len(lines) >= articles:
            break
        lines.setdefault(article, []).extend(f"{w}/{t}" for w, t in pairs)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("  ".join(words) + "\n" for words in lines.values()),
                    encoding="utf-8")
    return path


def run_arm(arm: str, out: Path, tokenizer: Path, minutes: float, articles: int,
            seeds: list[int], max_train: int | None, max_eval: int | None, epochs: float,
            threads: int) -> dict:
    data = out / "encoded"
    encode([str(tagged_corpus(out, articles))], data, tokenizer, entities="tags", workers=1,
           progress=False)  # an earlier run's shards are kept (encode resumes)
    recipe = with_fields(load_recipe("ernie-demo"), [f"data.masking={MASKING[arm]}"])
    recipe = replace(with_overrides(recipe, budget_minutes=minutes), budget_clock="cpu",
                     checkpoint_every=0, name=f"entity-masking-{arm}")
    run = RunSettings(device="cpu", threads=threads, progress=False)
    run_dir = out / arm
    summary = pretrain_recipe(recipe, run, data, run_dir, resume=(run_dir / "final").is_dir())
    ner = finetune("pd98-ner", out / f"ner-{arm}", model=run_dir, seeds=seeds,
                   max_train=max_train, max_eval=max_eval, save_model=False,
                   training=TaskTraining(epochs=epochs, batch_size=32), run=run)
    result = {"arm": arm, "masking": MASKING[arm], "minutes": minutes, "articles": articles,
              "steps": summary["steps"], "mlm_eval": summary.get("eval"),
              "ner": ner["summary"], "seeds": seeds, "max_train": max_train,
              "max_eval": max_eval}
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def table(out: Path) -> str:
    rows = ["| arm | masking | minutes | steps | held-out MLM acc | NER dev F1 | NER test F1 |",
            "|---|---|---|---|---|---|---|"]
    for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        dev, test = r["ner"]["dev"]["f1"], r["ner"]["test"]["f1"]
        acc = r["mlm_eval"]["accuracy"] if r.get("mlm_eval") else float("nan")
        rows.append(f"| {r['arm']} | {r['masking']} | {r['minutes']:g} | {r['steps']} | "
                    f"{acc:.2%} | {dev[0]:.4f} ± {dev[1]:.4f} | {test[0]:.4f} ± {test[1]:.4f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", choices=[*MASKING, "table"], required=True)
    p.add_argument("--out", type=Path, default=Path("runs/entity_masking"))
    p.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer"))
    p.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of pretraining")
    p.add_argument("--articles", type=int, default=0, help="training articles (0 = all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-train", type=int, default=None, help="NER training examples")
    p.add_argument("--max-eval", type=int, default=None, help="NER dev and test examples")
    p.add_argument("--epochs", type=float, default=1.0, help="NER fine-tuning epochs")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.arm != "table":
        r = run_arm(a.arm, a.out, a.tokenizer, a.minutes, a.articles, a.seeds, a.max_train,
                    a.max_eval, a.epochs, a.threads)
        print(json.dumps(r, indent=1))
    print(table(a.out))


if __name__ == "__main__":
    main()
