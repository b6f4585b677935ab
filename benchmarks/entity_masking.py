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
(`budget_clock: cpu`), so arms compare at equal work on a shared machine. Each arm is
pretrained once per seed of `--seeds` (out/<arm>/seedN, recipe seed N), each model fine-tunes
pd98-ner (seed 100 N + 1, `--max-train` examples) and appends its dev/test entity F1 to
--out/results.jsonl; seeds already there are skipped, so a re-run continues. `--arm
random-init` fine-tunes the entity arm's shape from random weights with the same seeds (the
control: does the pretraining matter at all at this budget?). `--arm table` prints mean ± std
per arm and each arm − entity, called only beyond √(std₁² + std₂²) as in docs/objectives.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.objectives import _pm, _vs_reference  # noqa: E402
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


def done_seeds(out: Path, arm: str) -> set[int]:
    """Seeds of `arm` with a line in out/results.jsonl (a re-run skips them)."""
    path = out / "results.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return {json.loads(line).get("seed") for line in lines if json.loads(line)["arm"] == arm}


def run_arm(arm: str, out: Path, tokenizer: Path, minutes: float, articles: int,
            seeds: list[int], max_train: int | None, max_eval: int | None, epochs: float,
            threads: int) -> list[dict]:
    """Per pretraining seed N: pretrain out/<arm>/seedN (recipe seed N), fine-tune pd98-ner
    from it with seed 100 N + 1 and append a line to out/results.jsonl. `random-init`
    fine-tunes the entity arm's shape from random weights with the same seeds instead."""
    data = out / "encoded"
    encode([str(tagged_corpus(out, articles))], data, tokenizer, entities="tags", workers=1,
           progress=False)  # an earlier run's shards are kept (encode resumes)
    run = RunSettings(device="cpu", threads=threads, progress=False)
    results = []
    for seed in sorted(set(seeds) - done_seeds(out, arm)):
        summary: dict = {}
        if arm == "random-init":
            model = out / "entity" / f"seed{seed}"
            if not (model / "final").is_dir():
                sys.exit(f"{model}/final: run --arm entity with --seeds {seed} first (the "
                         "random-init control takes its shape)")
        else:
            recipe = with_fields(load_recipe("ernie-demo"),
                                 [f"data.masking={MASKING[arm]}", f"seed={seed}"])
            recipe = replace(with_overrides(recipe, budget_minutes=minutes), budget_clock="cpu",
                             checkpoint_every=0, name=f"entity-masking-{arm}")
            model = out / arm / f"seed{seed}"
            summary = pretrain_recipe(recipe, run, data, model,
                                      resume=(model / "final").is_dir())
        ner = finetune("pd98-ner", out / f"ner-{arm}" / f"seed{seed}", model=model,
                       seeds=[100 * seed + 1], max_train=max_train, max_eval=max_eval,
                       save_model=False, random_init=arm == "random-init",
                       training=TaskTraining(epochs=epochs, batch_size=32), run=run)
        result = {"arm": arm, "masking": MASKING.get(arm), "minutes": minutes,
                  "articles": articles, "seed": seed, "steps": summary.get("steps"),
                  "mlm_eval": summary.get("eval"), "ner": ner["summary"],
                  "max_train": max_train, "max_eval": max_eval, "epochs": epochs}
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        results.append(result)
    return results


def table(out: Path, reference: str = "entity") -> str:
    """Mean ± std over the pretraining seeds of each arm; "vs entity": arm − entity in F1
    points, called only beyond the noise of a difference (docs/objectives.md's rule)."""
    runs: dict[str, list[dict]] = {}
    for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        runs.setdefault(r["arm"], []).append(r)
    ref_test = [r["ner"]["test"]["f1"][0] for r in runs.get(reference, [])]
    rows = ["| arm | masking | seeds | steps | held-out MLM acc % | NER dev F1 % | "
            f"NER test F1 % | test vs {reference} |", "|---|---|---|---:|---:|---:|---:|---|"]
    for arm in (*MASKING, "random-init"):
        rs = runs.get(arm, [])
        if not rs:
            continue
        accs = [r["mlm_eval"]["accuracy"] for r in rs if r.get("mlm_eval")]
        test = [r["ner"]["test"]["f1"][0] for r in rs]
        rows.append(
            f"| {arm} | {rs[0]['masking'] or '—'} | {', '.join(str(r['seed']) for r in rs)} | "
            f"{_pm([r['steps'] for r in rs if r['steps']], 1.0, 0)} | {_pm(accs)} | "
            f"{_pm([r['ner']['dev']['f1'][0] for r in rs])} | {_pm(test)} | "
            f"{'ref.' if arm == reference else _vs_reference(ref_test, test)} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", choices=[*MASKING, "random-init", "table"], required=True)
    p.add_argument("--out", type=Path, default=Path("runs/entity_masking"))
    p.add_argument("--tokenizer", type=Path, default=Path("runs/demo/tokenizer"))
    p.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of pretraining")
    p.add_argument("--articles", type=int, default=0, help="training articles (0 = all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="pretraining seeds N (each model fine-tuned with seed 100 N + 1)")
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
