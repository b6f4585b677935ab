"""End to end through the real CLI: user files → clean → vocabulary → encoded shards."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np

from motian.data.shards import EncodedDataset
from motian.data.sources import iter_documents


def test_prepare_cli_on_user_files(tmp_path):
    # A user corpus of real text: 150 People's Daily articles (blank-line separated .txt) and
    # the same articles again as .jsonl, so exact deduplication has work to do.
    docs = [d.text for d in itertools.islice(iter_documents(["pd98"]), 150)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "news.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with open(corpus / "news.jsonl", "w", encoding="utf-8") as f:
        for text in docs[:50]:
            f.write(json.dumps({"body": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "motian.cli", "prepare", "--inputs", str(corpus), "--out",
           str(out), "--txt-mode", "blank", "--text-field", "body", "--vocab-size", "2000",
           "--workers", "1", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").is_file()

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    documents = report["clean"]["documents"]  # a KeyError here fails the test, never skips
    data = EncodedDataset(out / "encoded", vocab_file=out / "tokenizer" / "vocab.txt")
    # the 50 repeated articles were dropped as duplicates (pd98's held-out articles are matched
    # by their line in the bundled corpus, so a user's copy is not); every kept one was encoded
    assert documents == {"read": 200, "kept": 150, "dropped": {"exact_duplicate": 50}}
    assert data.n_docs == documents["kept"]
    shard = data.shard(0)
    assert shard.tokens.dtype in (np.uint16, np.uint32) and len(shard.tokens) > 10_000
    assert shard.flags[0] & 1  # the first token starts a word

    # Running the same command again resumes: nothing to redo, same shards.
    before = np.array(shard.tokens)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(before, EncodedDataset(out / "encoded").shard(0).tokens)


# --------------------------------------------------------------------------- held-out texts


def test_clean_drops_heldout_reviews_wherever_they_come_from(tmp_path):
    from motian.data.clean import HELDOUT, normalize_text
    from motian.pipeline import clean
    from motian.tasks.builtin import reviews_sentiment

    task = reviews_sentiment()
    held = [e.text for e in task.splits["dev"][:15] + task.splits["test"][:15]]
    train = [e.text for e in task.splits["train"][:40]]
    corpus = tmp_path / "reviews.txt"  # a user's copy of the reviews, one held-out line twice
    corpus.write_text("\n".join(train + held + held[:1]) + "\n", encoding="utf-8")
    rep = clean([str(corpus)], tmp_path / "clean", workers=1, progress=False, min_chars=1)
    kept = [json.loads(line)["text"] for line in open(tmp_path / "clean" / "clean-00000.jsonl",
                                                      encoding="utf-8")]
    assert set(kept) == {normalize_text(t) for t in train}  # the train texts, none other
    assert rep["documents"]["dropped"][HELDOUT] == len(held) + 1
    assert "held-out task texts removed: 31 documents" in (tmp_path / "clean" / "report.md"
                                                          ).read_text(encoding="utf-8")
    off = clean([str(corpus)], tmp_path / "kept", workers=1, progress=False, min_chars=1,
                exclude_heldout=False)
    assert HELDOUT not in off["documents"]["dropped"]


def test_heldout_pd98_articles_are_exactly_the_dev_and_test_articles():
    from motian.pipeline import heldout_matcher
    from motian.tasks.builtin import pd98_ner

    split_of_line: dict[int, set[str]] = {}
    task = pd98_ner()
    for split, examples in task.splits.items():
        for e in examples:
            split_of_line.setdefault(int(e.where.rsplit(":", 1)[1]), set()).add(split)
    match = heldout_matcher(["pd98"])
    docs = list(iter_documents(["pd98"]))
    starts = [d.line for d in docs] + [max(split_of_line) + 1]
    dropped = 0
    for doc, end in zip(docs, starts[1:]):
        splits = set().union(*(split_of_line.get(n, set()) for n in range(doc.line, end)))
        assert len(splits) == 1  # an article never spans two splits
        assert (match(doc) is not None) == (splits != {"train"}), (doc.line, splits)
        dropped += match(doc) is not None
    assert 0.15 * len(docs) < dropped < 0.25 * len(docs)  # 2 articles in 10


# --------------------------------------------------------------------------- own texts


def test_exclude_keeps_own_eval_texts_out_and_prepare_takes_clean_thresholds(tmp_path):
    """`prepare --exclude` with a fine-tuning dev.jsonl and a plain-text test file: their texts
    are removed wherever they appear (a whole document, one line of an article, with
    full-width characters), the count is printed and in the report; a clean threshold given to
    prepare reaches clean; a resume with other --exclude files is refused."""
    from motian.data.clean import EXCLUDED, normalize_text

    paragraphs = [line for d in itertools.islice(iter_documents(["pd98"]), 40)
                  for line in d.text.split("\n") if len(line) > 20][:120]
    dev, test, train = paragraphs[:10], paragraphs[10:15], paragraphs[15:]
    article = "\n".join(train[:3] + [test[0]])  # an own test text as one line of an article
    fullwidth = dev[1].replace("1", "１").replace("2", "２") + "　"  # normalises to dev[1]
    english = "This paragraph is English only and the default min_cjk_ratio would drop it."
    corpus = tmp_path / "corpus.jsonl"
    docs = train[3:] + dev + [article, fullwidth, english]
    corpus.write_text("".join(json.dumps({"id": i, "content": t}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(docs)), encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text("".join(
        json.dumps({"text": t, "label": "x"}, ensure_ascii=False) + "\n" for t in dev),
        encoding="utf-8")
    (tmp_path / "test.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "motian.cli", "prepare", "--inputs", str(corpus), "--out",
           str(out), "--text-field", "content", "--vocab-size", "600", "--workers", "1",
           "--min-cjk-ratio", "0", "--no-progress", "--exclude", str(tmp_path / "dev.jsonl"),
           str(tmp_path / "test.txt")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--exclude: 15 distinct texts read from" in done.stdout
    assert "12 documents holding one removed" in done.stdout  # 10 dev + article + full-width
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    clean_report = report["clean"]
    assert clean_report["documents"]["dropped"] == {EXCLUDED: 12}
    assert clean_report["excluded"]["texts"] == 15
    assert clean_report["excluded"]["files"] == {str(tmp_path / "dev.jsonl"): 10,
                                                 str(tmp_path / "test.txt"): 5}
    assert clean_report["settings"]["min_cjk_ratio"] == 0
    kept = [json.loads(line)["text"] for line in open(out / "clean" / "clean-00000.jsonl",
                                                      encoding="utf-8")]
    assert english in kept  # min_cjk_ratio 0 reached clean
    own = {normalize_text(t) for t in dev + test}
    assert not any(line in own for text in kept for line in text.split("\n"))
    assert len(kept) == len(train) - 3 + 1
    assert "--exclude: 15 distinct texts" in (out / "report.md").read_text(encoding="utf-8")

    # The same command resumes; other --exclude texts are refused with what to do.
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    (tmp_path / "test.txt").write_text("\n".join(test[:2]) + "\n", encoding="utf-8")
    other = subprocess.run(cmd, capture_output=True, text=True)
    assert other.returncode == 1 and "exclude_digest" in other.stderr
    assert "--no-resume" in other.stderr and "Traceback" not in other.stderr


def test_exclude_file_errors_name_the_line(tmp_path):
    from motian.errors import UserError
    from motian.pipeline import clean

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天的天气非常好，我们去公园散步。\n", encoding="utf-8")
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"text": "第一条"}\n{"sentence": "第二条", "label": 1}\n', encoding="utf-8")
    for path, expected in [(bad, f"{bad}:2: no text in this record (keys: sentence, label)"),
                           (tmp_path / "missing.jsonl", "no such file")]:
        try:
            clean([str(corpus)], tmp_path / "clean", exclude=[path], workers=1,
                  progress=False)
        except UserError as err:
            assert expected in str(err)
        else:
            raise AssertionError(f"--exclude {path} was accepted")
    assert not (tmp_path / "clean").exists()  # refused before anything was written
    # the record's own field names the text: --text-field sentence reads it
    rep = clean([str(corpus)], tmp_path / "clean", exclude=[bad], text_field="sentence",
                workers=1, progress=False)
    assert rep["excluded"]["texts"] == 2


def test_prepare_exposes_every_clean_threshold_with_the_same_default():
    import inspect

    from motian.data.clean import CleanSettings
    from motian.pipeline import clean, prepare

    ours = inspect.signature(prepare).parameters
    theirs = inspect.signature(clean).parameters
    for name in ("min_chars", "max_chars", "min_cjk_ratio", "max_symbol_ratio",
                 "max_char_repeat", "max_dup_line_ratio", "near_dup_threshold", "exclude"):
        assert ours[name].default == theirs[name].default, name
        if hasattr(CleanSettings, name):
            assert ours[name].default == getattr(CleanSettings, name), name


# --------------------------------------------------------------------------- the demo


# The demo recipe's objective and schedule at a test's size (a 6-second pretraining).
TINY_DEMO = """\
model:
  preset: tiny
  overrides: {hidden: 32, layers: 2, heads: 2, ffn: 64, max_positions: 128, norm: pre}
data: {masking: wwm, pair_task: none}
objective: {kind: mlm, weighting: uncertainty}
optim: {name: adamw, lr: 0.002, weight_decay: 0.01, clip_norm: 1.0, decay: linear}
stages:
  - {fraction: 1.0, seq_len: 64, global_batch: 8, warmup: 0.05}
eval: {every: 0, seq_len: 64, rows: 16, batch: 8}
checkpoint_every: 1000
"""


def test_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    from motian.pipeline import demo
    from motian.tasks.builtin import reviews_heldout_texts, reviews_sentiment

    # A small corpus in place of the bundled one (cleaning and encoding all of it takes a
    # minute): 120 People's Daily articles and 600 reviews, 100 of them held-out ones.
    articles = [d.text for d in itertools.islice(iter_documents(["pd98"]), 120)]
    task = reviews_sentiment()
    held = [e.text for e in task.splits["test"][:100]]
    reviews = [e.text for e in task.splits["train"][:500]] + held
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                              for t in articles + reviews), encoding="utf-8")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_DEMO, encoding="utf-8")
    out = tmp_path / "demo"
    report = demo(out, budget=0.2, workers=1, recipe=str(recipe), inputs=[str(corpus)],
                  progress=False)

    dropped = report["clean"]["documents"]["dropped"]["heldout_task_text"]
    assert dropped == len(held)
    heldout = reviews_heldout_texts()
    for line in open(out / "clean" / "clean-00000.jsonl", encoding="utf-8"):
        assert json.loads(line)["text"].strip() not in heldout
    # pretraining ran and left its tokenizer with the model: fine-tuning found it alone
    assert (out / "pretrain" / "final" / "tokenizer.json").is_file()
    for name in ("finetune-reviews-sentiment", "finetune-pd98-ner",
                 "finetune-reviews-sentiment-random-init", "finetune-pd98-ner-random-init"):
        result = json.loads((out / name / "results.json").read_text(encoding="utf-8"))
        assert result["runs"][0]["test"], name
        assert result["config"]["tokenizer"].endswith("final")
        assert (out / name / "seed-1" / "metrics.jsonl").is_file()
    assert (out / "distill" / "results.json").is_file()
    assert (out / "export" / "model.onnx").is_file()
    # the demo's classifiers (teacher and distilled student) read the token mean, not [CLS]
    for model in (out / "finetune-reviews-sentiment" / "seed-1" / "model", out / "export"):
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        assert config["model"]["classifier_pooling"] == "mean", model
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## Downstream" in text and "held-out task texts removed: 100" in text
    assert "pd98-ner" in text and "distill student" in text
    printed = capsys.readouterr().out
    assert "| pretrained | reviews-sentiment | test | accuracy |" in printed
