"""Metrics against values worked out by hand: classification, tagging conversions, entity-level
scores and CMRC-style EM/F1 for Chinese answers."""

import math

import pytest

from motian.tasks.metrics import (
    accuracy,
    entity_prf,
    macro_f1,
    mean_std,
    mixed_segments,
    span_em_f1,
    spans_to_tags,
    squad_scores,
    tags_to_spans,
)


def test_accuracy_and_macro_f1_by_hand():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    assert accuracy(gold, pred) == pytest.approx(4 / 6)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(gold, pred) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class never seen nor predicted still counts (as 0) when num_labels says it exists
    assert macro_f1(gold, pred, num_labels=4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])


def test_bio_and_bioes_spans():
    bio = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert tags_to_spans(bio) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC")]
    bioes = ["S-PER", "B-ORG", "I-ORG", "E-ORG", "O", "B-LOC", "E-LOC"]
    assert tags_to_spans(bioes) == [(0, 1, "PER"), (1, 4, "ORG"), (5, 7, "LOC")]
    # conlleval's leniency: I- after O or after another type starts an entity
    assert tags_to_spans(["O", "I-PER", "I-LOC"]) == [(1, 2, "PER"), (2, 3, "LOC")]
    spans = [(0, 1, "PER"), (2, 5, "ORG"), (6, 8, "LOC")]
    for scheme in ("BIO", "BIOES"):
        assert tags_to_spans(spans_to_tags(spans, 9, scheme)) == spans
    assert spans_to_tags(spans, 9, "BIOES")[:6] == ["S-PER", "O", "B-ORG", "I-ORG", "E-ORG", "O"]


def test_entity_prf_counts_exact_typed_spans():
    gold = [[(0, 2, "PER"), (3, 5, "LOC")], [(1, 3, "ORG")]]
    pred = [[(0, 2, "PER"), (3, 5, "ORG")], [(1, 3, "ORG"), (4, 6, "PER")]]
    scores = entity_prf(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 4)  # wrong type and a spurious span miss
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert entity_prf([[]], [[]])["f1"] == 0.0


def test_cmrc_normalisation_and_f1():
    assert mixed_segments("iPhone 8手机，很好!") == ["iphone", "8", "手", "机", "很", "好"]
    assert span_em_f1(["北京。"], "北京") == (1.0, 1.0)  # punctuation does not count
    em, f1 = span_em_f1(["中华人民共和国"], "人民共和国")  # common run 5: p 1, r 5/7
    assert em == 0.0 and f1 == pytest.approx(2 * (5 / 7) / (1 + 5 / 7))
    # the best gold answer wins; a non-contiguous overlap only counts its longest run
    assert span_em_f1(["上海", "人民共和国"], "人民共和国") == (1.0, 1.0)
    em, f1 = span_em_f1(["甲乙丙丁"], "甲乙X丙丁")
    assert f1 == pytest.approx(2 * (2 / 5) * (2 / 4) / (2 / 5 + 2 / 4))
    scores = squad_scores([["北京"], ["上海"]], ["北京", "南京"])
    assert scores == {"em": 0.5, "f1": 0.5}


def test_mean_std_is_sample_std():
    mean, std = mean_std([0.7, 0.8, 0.9])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))
