"""The Cilin synonym table: groups parsed from the real file, same-length rows, token ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from motian.data.shards import SynonymTable
from motian.data.sources import iter_documents
from motian.data.synonyms import build_synonym_table, parse_cilin
from motian.data.tokenizer import load_tokenizer, train_tokenizer
from motian.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syn")
    docs = [d.text for d in itertools.islice(iter_documents(["pd98"]), 300)]
    (tmp / "c.txt").write_text("\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
    train_tokenizer([str(tmp / "c.txt")], tmp / "tok", vocab_size=5000, progress=False)
    return load_tokenizer(tmp / "tok")


@pytest.fixture(scope="module")
def groups():
    return parse_cilin()


def test_parse_real_cilin(groups):
    # 9,995 '=' lines in the shipped file; '#' (related) and '@' (alone) lines are not groups
    assert 9000 < len(groups) <= 9995
    assert groups[0] == ["人", "士", "人物", "人士", "人氏", "人选"]
    assert all(len(g) > 1 for g in groups)


def test_rows_are_same_length_synonyms_from_the_words_groups(tok, groups):
    table, rows = build_synonym_table(tok, groups)
    assert len(rows) > 10_000
    members: dict[str, set[str]] = {}
    for g in groups:
        for w in g:
            members.setdefault(w, set()).update(g)
    unk = tok.token_to_id("[UNK]")
    for word, r in itertools.islice(rows.items(), 0, None, 37):
        own = tok.encode(word, add_special_tokens=False).ids
        assert table.words[r] == word and table.length[r] == len(own) and len(word) >= 2
        for cand in table.candidates(r):
            text = tok.decode(cand).replace(" ", "")
            assert len(cand) == len(own) and unk not in cand and cand != own
            assert len(text) == len(word) and text in members[word] and text != word


def test_union_of_groups_and_length_filter(tok):
    groups = [["美丽", "漂亮", "美", "好看的"], ["美丽", "秀丽"], ["漂亮", "出色"]]
    table, rows = build_synonym_table(tok, groups)
    decoded = {w: sorted(tok.decode(c).replace(" ", "") for c in table.candidates(r))
               for w, r in rows.items()}
    # 美丽 is in two groups: both contribute; 美 and 好看的 have another length
    assert decoded["美丽"] == ["漂亮", "秀丽"]
    assert decoded["漂亮"] == ["出色", "美丽"]
    assert "美" not in rows
    # with single characters allowed, 美 still has no same-length partner here
    _, rows1 = build_synonym_table(tok, groups + [["美", "丽"]], min_chars=1)
    assert "美" in rows1 and "丽" in rows1


def test_table_round_trips_through_npz(tok, tmp_path):
    table, rows = build_synonym_table(tok, [["人民", "群众", "民众"], ["国家", "江山"]])
    table.save(tmp_path / "synonyms.npz")
    back = SynonymTable.load(tmp_path / "synonyms.npz")
    assert back.words == table.words
    for r in range(len(back.words)):
        assert back.candidates(r) == table.candidates(r)
    assert np.array_equal(back.tokens, table.tokens)


def test_bad_cilin_line_names_file_and_line(tmp_path):
    path = tmp_path / "cilin.txt"
    path.write_text("Aa01A01= 人 士\nnot a cilin line\n", encoding="utf-8")
    with pytest.raises(UserError, match="cilin.txt:2"):
        parse_cilin(path)
