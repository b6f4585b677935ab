"""Pair-task examples: sentence order from real text, click logs from the user's files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.data.pairs import ClickSettings, read_click_log, sentence_index, sop_plan
from motian.data.shards import PARAGRAPH_START, SENTENCE_START, EncodedDataset
from motian.errors import SkipLog, UserError

CLS, SEP = 2, 3


def test_sop_plan_on_real_text(pd98_encoded):
    ds = EncodedDataset(pd98_encoded)
    shards = [ds.shard(i) for i in range(len(ds))]
    sentences = sentence_index(shards)
    cap = 61
    plan = sop_plan(sentences, cap, np.random.default_rng(0))
    assert len(plan.label) > 100 and 0.4 < plan.label.mean() < 0.6
    assert (plan.a_len > 0).all() and (plan.b_len > 0).all()
    assert (plan.a_len + plan.b_len <= cap).all()
    first = np.where(plan.label == 1, plan.a_start + plan.a_len, plan.b_start + plan.b_len)
    second = np.where(plan.label == 1, plan.b_start, plan.a_start)
    assert np.array_equal(first, second)  # the two segments meet: the junction is kept
    for i in range(len(plan.label)):
        s = shards[plan.shard[i]]
        docs = np.asarray(s.docs)
        later = plan.b_start[i] if plan.label[i] == 1 else plan.a_start[i]
        # The later segment starts a sentence, in the same document as the earlier one.
        assert s.flags[later] & (SENTENCE_START | PARAGRAPH_START)
        lo, hi = sorted((plan.a_start[i], plan.b_start[i]))
        assert np.searchsorted(docs, lo, "right") == np.searchsorted(docs, hi, "right")
    other = sop_plan(sentences, cap, np.random.default_rng(1))
    assert not np.array_equal(plan.a_start[:50], other.a_start[:50])  # new pairs each epoch


def write_click_log(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_click_log_parsing_reports_bad_lines_with_file_and_line(tmp_path):
    path = write_click_log(tmp_path / "clicks.tsv", [
        "北京天气\t北京今日天气预报\t1",
        "上海房价\t上海市住房价格走势\t0",
        "没有标签的行",
        "苹果手机\t苹果发布新手机\t2",
        "电影推荐\t近期上映电影\t100\t7",
        "电影推荐\t近期上映电影\t5\t9",
        "",
        "\t空查询\t1",
    ])
    skips = SkipLog(warn=False)
    pairs = read_click_log(path, skips)
    assert [(p.query, p.label) for p in pairs] == [("北京天气", 1), ("上海房价", 0),
                                                   ("电影推荐", 1)]
    assert skips.total == 4
    examples = " ".join(e for ex in skips.examples.values() for e in ex)
    for line in (3, 4, 6, 8):
        assert f"{path}:{line}:" in examples
    assert read_click_log(write_click_log(tmp_path / "c2.tsv", ["q\tt\t10\t1"]), skips,
                          ClickSettings(min_ctr=0.2))[0].label == 0


def test_click_pairs_in_the_loader(pd98_encoded, tmp_path):
    rows = [("中国经济", "中国经济发展迅速", 1), ("联合国会费", "安理会讨论会费问题", 1),
            ("农业", "今天的天气很好", 0), ("人民日报", "新年献词", 0)] * 3
    path = write_click_log(tmp_path / "clicks.tsv", [f"{q}\t{t}\t{y}" for q, t, y in rows])
    cfg = LoaderConfig(seq_len=24, batch_size=4, pair_task="click", click_files=(str(path),),
                       masking=MaskingConfig.preset("wwm"))
    loader = PackedLoader(pd98_encoded, config=cfg)
    assert loader.steps_per_epoch == 3
    click = loader.shards[-1]  # encoded like the shards: jieba word starts and Cilin rows
    assert 0 < (click.flags & 1).sum() < len(click.tokens) and (click.synonyms >= 0).any()
    seen = []
    for arrays, m in itertools.islice(loader.iter_numpy(), 3):
        for r in range(4):
            n = int(arrays["attention_mask"][r].sum())
            ids = arrays["tokens"][r, :n].tolist()
            assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2
            cut = ids.index(SEP)
            query = "".join(loader.vocab[t] for t in ids[1:cut])
            title = "".join(loader.vocab[t] for t in ids[cut + 1:-1])
            segments = arrays["token_type_ids"][r, :n].tolist()
            assert segments == [0] * (cut + 1) + [1] * (n - cut - 1)
            seen.append((query, title, int(arrays["pair_labels"][r])))
            assert m.actions[r, :n][[0, cut, n - 1]].tolist() == [0, 0, 0]  # specials kept
    assert sorted(seen) == sorted(rows)  # every pair once per epoch, with its own label


def test_click_log_without_valid_lines_is_a_user_error(pd98_encoded, tmp_path):
    path = write_click_log(tmp_path / "bad.tsv", ["just text", "a\tb\tyes"])
    cfg = LoaderConfig(seq_len=32, batch_size=1, pair_task="click", click_files=(str(path),))
    with pytest.raises(UserError, match="no valid line"):
        PackedLoader(pd98_encoded, config=cfg)
    with pytest.raises(UserError, match="click_files"):
        LoaderConfig(pair_task="click")
