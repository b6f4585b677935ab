"""`motian long-data` (motian/long_text.py): People's Daily 1998 as long text, its stream and
article views, the held-out test articles, and the longformer-demo recipe trained on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from motian.data.stream import document_stream, split_documents
from motian.data.tokenizer import load_tokenizer
from motian.errors import UserError
from motian.long_text import HOLDOUT_EVERY, long_articles, long_data, view_rows
from motian.pretraining import pretrain
from motian.train.recipe import RunSettings, load_recipe

ARTICLES = 60  # the paper's first 60: 6 dev articles left out, 6 test articles held out


@pytest.fixture(scope="module")
def long_corpus(pd98_encoded, tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "pd98"
    summary = long_data(pd98_encoded / "vocab.txt", out, seq_len=[64, 256], articles=ARTICLES,
                        progress=False)
    return out, summary


def test_dev_articles_are_left_out_and_test_articles_are_the_held_out_split(pd98_encoded,
                                                                           long_corpus):
    out, summary = long_corpus
    texts, is_test = long_articles(ARTICLES)
    assert summary["articles"] == len(texts) == ARTICLES - 6
    assert summary["heldout_articles"] == sum(is_test) == 6
    # Token counts of the held-out documents (as pretraining's split sees them) are those of
    # the test articles, in order; those of the training documents, the other kept ones.
    tok = load_tokenizer(pd98_encoded / "vocab.txt")
    lengths = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    for held_out in (False, True):
        docs, _ = split_documents(out / "encoded", HOLDOUT_EVERY, held_out)
        assert [len(d) for d in docs] == [n for n, t in zip(lengths, is_test) if t == held_out]
    # A dev article (the paper's 9th, index 8) is in no document.
    from motian.data.sources import iter_documents

    dev = next(d for n, d in enumerate(iter_documents(["pd98"])) if n == 8).text
    assert dev not in (out / "pd98-articles.txt").read_text(encoding="utf-8")
    assert texts[8] == next(d for n, d in enumerate(iter_documents(["pd98"])) if n == 9).text


def test_stream_view_is_the_articles_in_order_cut_into_rows(long_corpus):
    out, summary = long_corpus
    for split, held_out in (("train", False), ("heldout", True)):
        rows = np.load(out / "stream-64" / f"{split}.tokens.npy")
        stream, _ = document_stream(out / "encoded", HOLDOUT_EVERY, held_out)
        assert rows.shape == (len(stream) // 64, 64)
        assert np.array_equal(rows.reshape(-1), stream[:rows.size])
        article = np.load(out / "stream-64" / f"{split}.article.npy")
        assert (np.diff(article) >= 0).all() and article[0] == 0
    manifest = json.loads((out / "stream-256" / "view.json").read_text(encoding="utf-8"))
    assert manifest["splits"]["heldout"]["padding"] == 0.0
    assert manifest == summary["views"]["stream-256"]


def test_articles_view_gives_each_article_its_own_padded_rows(long_corpus):
    out, _ = long_corpus
    vocab = (out / "encoded" / "vocab.txt").read_text(encoding="utf-8").split("\n")
    cls, sep, pad = (vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    docs, _ = split_documents(out / "encoded", HOLDOUT_EVERY, held_out=False)
    rows = np.load(out / "articles-64" / "train.tokens.npy")
    article = np.load(out / "articles-64" / "train.article.npy")
    for i, doc in enumerate(docs):  # the rows of article i, unpadded, are [CLS] doc [SEP]
        mine = rows[article == i].reshape(-1)
        assert np.array_equal(mine[mine != pad], np.concatenate([[cls], doc, [sep]]))
    counts = json.loads((out / "articles-256" / "view.json").read_text())["splits"]["train"]
    assert counts["articles"] == len(docs) and 0 < counts["padding"] < 1
    assert counts["articles_cut"] == sum(len(d) + 2 > 256 for d in docs)


def test_bad_settings_are_refused_with_what_to_do(pd98_encoded, long_corpus, tmp_path):
    out, _ = long_corpus
    with pytest.raises(UserError, match="--seq-len 4"):
        long_data(pd98_encoded / "vocab.txt", tmp_path, seq_len=[4], articles=ARTICLES)
    with pytest.raises(UserError, match="--articles 5.*at least 10"):
        long_data(pd98_encoded / "vocab.txt", tmp_path, articles=5)
    with pytest.raises(UserError, match="--view windows"):
        view_rows(out / "encoded", "windows", 64, held_out=False)
    with pytest.raises(UserError, match="no-such-tokenizer"):
        long_data(tmp_path / "no-such-tokenizer", tmp_path / "x", articles=ARTICLES)
    with pytest.raises(UserError, match="fewer than one row of 100000"):
        view_rows(out / "encoded", "stream", 100_000, held_out=True)


def test_longformer_demo_recipe_trains_on_the_long_corpus(long_corpus, tmp_path):
    out, _ = long_corpus
    recipe = load_recipe("longformer-demo")
    assert recipe.model.overrides["attention"] == "sliding"
    assert recipe.eval.holdout_every == HOLDOUT_EVERY and recipe.stages[0].seq_len == 1024
    summary = pretrain("longformer-demo", out / "encoded", tmp_path / "run", steps=2,
                       override=["eval.rows=2", "eval.batch=2"],
                       run=RunSettings(device="cpu", threads=1, progress=False))
    assert summary["steps"] == 2 and np.isfinite(summary["eval"]["loss"])
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model"]
    assert config["attention"] == "sliding" and config["attention_window"] == 128
    assert config["global_attention"] == "cls"


def test_every_benchmark_arm_builds_its_recipe():
    from benchmarks.long_ppl import ARMS, COMMON
    from benchmarks.pretrain import with_settings

    for arm in ARMS:
        r = with_settings(arm.recipe, [*COMMON, *arm.sets, "seed=2", "data.seed=2"])
        assert r.eval.holdout_every == HOLDOUT_EVERY and r.seed == 2 and r.data.seed == 2
    assert [a.slug for a in ARMS].count("two-stage") == 1
