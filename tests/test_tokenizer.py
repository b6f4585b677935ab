"""`motian tokenizer`: the [UNK] guard on real text, adopting a BERT vocab.txt, HF parity."""

from __future__ import annotations

import itertools
import json

import pytest
from tokenizers import trainers
from tokenizers.models import WordPiece

from motian.data.sources import iter_documents
from motian.data.tokenizer import (
    SPECIAL_TOKENS,
    bert_tokenizer,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
    unk_rate,
)
from motian.errors import UserError

MIXED = ["我买了iPhone12和ThinkPad X1，价格3.5万元！！", "Café au lait 很好喝 naïve CAFÉ",
         "COVID-19疫情期间，GDP增长2.3%。", "邮箱 test@example.com 网址 https://a.b/c?d=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 People's Daily articles and 1000 reviews (~0.9 MB), one document per line."""
    docs = [d.text.replace("\n", " ") for d in itertools.islice(iter_documents(["pd98"]), 400)]
    docs += [d.text for d in itertools.islice(iter_documents(["reviews"]), 1000)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(docs + MIXED) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    report = train_tokenizer([str(corpus)], out, vocab_size=6000, progress=False)
    return out, report


def _texts(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_every_character_is_in_the_vocabulary(trained, corpus):
    out, report = trained
    tok = load_tokenizer(out)
    unk, total = unk_rate(tok, _texts(corpus))
    assert total > 300_000
    assert unk / total < 0.001
    assert report["counts"]["unk_tokens"] == unk and report["counts"]["tokens"] == total
    # the corpus has far more than the 1000 characters the stock trainer keeps
    assert report["counts"]["alphabet"] > 3000
    assert report["counts"]["alphabet"] == report["counts"]["distinct_chars"]


def test_stock_limit_alphabet_would_fail_the_same_check(corpus):
    # The same pipeline with the trainer setting BertWordPieceTokenizer uses (1000 characters).
    tok = bert_tokenizer(WordPiece({"[UNK]": 0}, unk_token="[UNK]"), lowercase=True)
    trainer = trainers.WordPieceTrainer(vocab_size=6000, min_frequency=2, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS.values()),
                                        limit_alphabet=1000)
    tok.train_from_iterator(_texts(corpus), trainer)
    unk, total = unk_rate(tok, _texts(corpus))
    assert unk / total > 0.001


def test_files_and_manifest(trained):
    out, report = trained
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab)) == report["counts"]["vocab_size"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["kind"] == "tokenizer" and manifest["vocab_hash"] == report["vocab_hash"]
    assert special_token_ids(out) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    tok = load_tokenizer(out)
    # every CJK character is its own token
    assert tok.encode("人民日报", add_special_tokens=False).tokens == ["人", "民", "日", "报"]


def test_the_vocabulary_has_the_size_asked_for(trained, corpus, tmp_path):
    """The ##c forms of letters and digits used to come on top of the trainer's pieces (8,000
    asked, 8,001 given): the last learned merges now make room for them."""
    size = trained[1]["counts"]["alphabet"] + 300  # below what this text could fill
    report = train_tokenizer([str(corpus)], tmp_path, vocab_size=size, progress=False)
    counts = report["counts"]
    assert counts["continuations_added"] > 0  # the case that overflowed
    assert counts["merges_dropped_for_continuations"] == counts["continuations_added"]
    vocab = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == len(set(vocab)) == counts["vocab_size"] == size
    assert load_tokenizer(tmp_path).get_vocab_size() == size
    assert counts["unk_tokens"] / counts["tokens"] < 0.001  # no character was given up
    assert special_token_ids(tmp_path) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_rerun_keeps_the_vocabulary_unless_told(tmp_path):
    # Retraining is not bit-for-bit reproducible (the trainer breaks ties between equally
    # frequent merges in hash order), so a rerun with the same inputs and settings keeps the
    # vocabulary that shards may already have been encoded with.
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(MIXED * 5), encoding="utf-8")
    out = tmp_path / "tok"
    first = train_tokenizer([str(corpus)], out, vocab_size=300, progress=False)
    before = (out / "vocab.txt").stat().st_mtime_ns
    assert train_tokenizer([str(corpus)], out, vocab_size=300, progress=False) == first
    assert (out / "vocab.txt").stat().st_mtime_ns == before
    again = train_tokenizer([str(corpus)], out, vocab_size=300, resume=False, progress=False)
    assert (out / "vocab.txt").stat().st_mtime_ns != before
    assert again["settings"] == first["settings"]
    other = train_tokenizer([str(corpus)], out, vocab_size=250, progress=False)
    assert other["counts"]["vocab_size"] <= 250


def test_unseen_latin_word_splits_into_pieces(tmp_path):
    # 'q' and 'z' only ever start a word in training, so the trainer never makes ##q / ##z;
    # motian adds continuation forms for every letter, so "bq" is not one [UNK].
    corpus = tmp_path / "c.txt"
    corpus.write_text("q ab ba zed 中文\n" * 20, encoding="utf-8")
    train_tokenizer([str(corpus)], tmp_path / "tok", vocab_size=100, progress=False)
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.encode("bq az", add_special_tokens=False).tokens == ["b", "##q", "a", "##z"]


def test_transformers_bert_tokenizer_gives_the_same_ids(trained, corpus):
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    hf = transformers.BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    ours = load_tokenizer(out)
    texts = _texts(corpus)[::20] + MIXED
    for text in texts:
        assert hf(text)["input_ids"] == ours.encode(text).ids, text


def test_from_vocab_keeps_its_ids(tmp_path, corpus):
    # A hand-written BERT vocabulary with the special tokens at other ids than ours.
    tokens = ["[unused0]", "[PAD]", "人", "民", "日", "报", "[UNK]", "[CLS]", "[SEP]",
              "[MASK]", "a", "##b", "ab", "，", "。"]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    out = tmp_path / "adopted"
    report = train_tokenizer([str(corpus)], out, from_vocab=vocab_file, progress=False)
    assert (out / "vocab.txt").read_bytes() == vocab_file.read_bytes()
    assert special_token_ids(out) == {"pad": 1, "unk": 6, "cls": 7, "sep": 8, "mask": 9}
    tok = load_tokenizer(out)
    assert tok.encode("人民日报abb。", add_special_tokens=False).ids == [2, 3, 4, 5, 12, 11, 14]
    assert tok.encode("人民").ids == [7, 2, 3, 8]
    # most of the corpus is outside this vocabulary, and the manifest says so
    assert report["counts"]["unk_rate"] > 0.5
    # a bare vocab.txt loads the same way (lower-casing guessed from the vocabulary)
    assert load_tokenizer(vocab_file).encode("人民AB").ids == tok.encode("人民AB").ids
    # a checkpoint directory's tokenizer_config.json decides lower-casing
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "vocab.txt").write_bytes(vocab_file.read_bytes())
    (ckpt / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    assert load_tokenizer(ckpt).encode("AB", add_special_tokens=False).tokens == ["[UNK]"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast(vocab_file=str(vocab_file))
    for text in _texts(corpus)[:50]:
        assert hf(text)["input_ids"] == tok.encode(text).ids


def test_bad_vocabularies_are_refused(tmp_path):
    no_unk = tmp_path / "vocab.txt"
    no_unk.write_text("[PAD]\n人\n", encoding="utf-8")
    with pytest.raises(UserError, match="no \\[UNK\\]"):
        load_tokenizer(no_unk)
    dup = tmp_path / "dup.txt"
    dup.write_text("[UNK]\n人\n人\n", encoding="utf-8")
    with pytest.raises(UserError, match="dup.txt:3"):
        load_tokenizer(dup)
    no_mask = tmp_path / "nomask.txt"
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n人\n", encoding="utf-8")
    with pytest.raises(UserError, match="MASK"):
        special_token_ids(no_mask)
    with pytest.raises(UserError, match="no such"):
        load_tokenizer(tmp_path / "missing")
