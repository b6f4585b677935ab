"""Masking: the known mistakes of the field, each as a test that fails if it comes back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import KEEP, MASK, NONE, RANDOM, SYNONYM, Masker, MaskingConfig
from motian.data.shards import SynonymTable

MASK_ID, CLS, SEP, PAD = 4, 2, 3, 0


def word_batch(rng, B=16, L=128, max_word=4, synonym_rows=None):
    """Rows of random words: (tokens, word_start, content, synonyms, word_id) with word_id the
    index of the word each token belongs to (-1 outside words)."""
    tokens = np.full((B, L), PAD, np.int64)
    start = np.zeros((B, L), bool)
    syn = np.full((B, L), -1, np.int64)
    word_id = np.full((B, L), -1, np.int64)
    w = 0
    for r in range(B):
        n_content = int(rng.integers(L // 2, L - 1))
        tokens[r, 0], p = CLS, 1
        while p < n_content:
            n = min(int(rng.integers(1, max_word + 1)), n_content - p)
            tokens[r, p: p + n] = rng.integers(10, 500, size=n)
            start[r, p] = True
            word_id[r, p: p + n] = w
            if synonym_rows is not None:
                syn[r, p] = synonym_rows.get(n, -1)
            p, w = p + n, w + 1
        tokens[r, p] = SEP
    content = word_id >= 0
    return tokens, start, content, syn, word_id


def masker(config, synonyms=None):
    return Masker(config, MASK_ID, np.arange(10, 500), synonyms or SynonymTable.empty())


@pytest.mark.parametrize("strategy", ["whole_word", "ngram", "span"])
def test_whole_words_are_masked_together(strategy):
    rng = np.random.default_rng(0)
    tokens, start, content, syn, word_id = word_batch(rng)
    m = masker(MaskingConfig(strategy=strategy))(tokens, start, content, syn, rng)
    chosen = np.zeros(tokens.size, bool)
    chosen[m.mlm_positions] = True
    ids = word_id.reshape(-1)
    for w in np.unique(ids[chosen]):
        assert chosen[ids == w].all(), f"word {w} only partly masked"


def test_token_strategy_masks_single_tokens():
    rng = np.random.default_rng(0)
    tokens, start, content, syn, word_id = word_batch(rng, max_word=4)
    m = masker(MaskingConfig(strategy="token"))(tokens, start, content, syn, rng)
    chosen = np.zeros(tokens.size, bool)
    chosen[m.mlm_positions] = True
    ids = word_id.reshape(-1)
    partial = [w for w in np.unique(ids[chosen]) if not chosen[ids == w].all()]
    assert partial  # BERT's token masking does split words


@pytest.mark.parametrize("strategy", ["token", "whole_word", "ngram"])
def test_replacement_is_decided_once_per_word(strategy):
    rng = np.random.default_rng(1)
    tokens, start, content, syn, word_id = word_batch(rng)
    cfg = MaskingConfig(strategy=strategy, mask_prob=0.4, random_prob=0.3, keep_prob=0.3)
    m = masker(cfg)(tokens, start, content, syn, rng)
    actions, ids = m.actions.reshape(-1), word_id.reshape(-1)
    unit = ids if strategy != "token" else np.where(ids >= 0, np.arange(ids.size), -1)
    for w in np.unique(unit[actions != NONE]):
        assert len(np.unique(actions[unit == w])) == 1, f"word {w} got several replacements"
    flat_in, flat_out = tokens.reshape(-1), m.input_ids.reshape(-1)
    assert (flat_out[actions == MASK] == MASK_ID).all()
    assert (flat_out[actions == KEEP] == flat_in[actions == KEEP]).all()
    assert (flat_out[actions == NONE] == flat_in[actions == NONE]).all()
    assert {MASK, RANDOM, KEEP} <= set(np.unique(actions).tolist())


def test_compact_labels_are_the_original_tokens_at_masked_positions():
    rng = np.random.default_rng(2)
    tokens, start, content, syn, _ = word_batch(rng)
    m = masker(MaskingConfig.preset("wwm"))(tokens, start, content, syn, rng)
    assert np.array_equal(m.mlm_positions, np.flatnonzero(m.actions.reshape(-1) != NONE))
    assert np.array_equal(m.mlm_labels, tokens.reshape(-1)[m.mlm_positions])
    assert content.reshape(-1)[m.mlm_positions].all()  # never [CLS], [SEP] or padding


@pytest.mark.parametrize("strategy", ["token", "whole_word", "ngram", "span"])
def test_budget_rate_and_never_over_by_more_than_a_word(strategy):
    rng = np.random.default_rng(3)
    cfg = MaskingConfig(strategy=strategy)
    masked_total = content_total = 0
    for _ in range(40):
        tokens, start, content, syn, word_id = word_batch(rng, max_word=4)
        m = masker(cfg)(tokens, start, content, syn, rng)
        per_row = np.bincount(m.mlm_positions // tokens.shape[1], minlength=len(tokens))
        n = content.sum(1)
        budget = np.maximum(1, np.floor(0.15 * n + 0.5))
        assert (per_row >= 1).all()
        assert (np.abs(per_row - budget) <= 4).all()  # within one word (<= 4 tokens) of it
        masked_total += per_row.sum()
        content_total += n.sum()
    assert abs(masked_total / content_total - 0.15) < 0.005


def test_no_empty_mask_even_on_tiny_rows():
    rng = np.random.default_rng(4)
    tokens = np.array([[CLS, 20, SEP, PAD, PAD], [CLS, 21, 22, 23, SEP]])
    start = np.array([[0, 1, 0, 0, 0], [0, 1, 0, 0, 0]], bool)
    content = np.isin(tokens, [CLS, SEP, PAD], invert=True)
    for _ in range(50):
        m = masker(MaskingConfig(rate=0.01))(tokens, start, content, np.full(tokens.shape, -1),
                                             rng)
        rows = set((m.mlm_positions // 5).tolist())
        assert rows == {0, 1}
        assert {6, 7, 8} <= set(m.mlm_positions.tolist())  # row 1's only word, whole


def test_ngram_masks_phrases_and_span_lengths_follow_the_law():
    rng = np.random.default_rng(5)
    tokens, start, content, syn, word_id = word_batch(rng, B=32, L=512, max_word=1)
    runs = {}
    for name, cfg in {"word": MaskingConfig(strategy="whole_word"),
                      "4gram": MaskingConfig(strategy="ngram", ngram_probs=(0, 0, 0, 1))}.items():
        lengths = []
        for _ in range(5):
            m = masker(cfg)(tokens, start, content, syn, rng)
            chosen = np.zeros(tokens.size + 1, np.int8)
            chosen[m.mlm_positions] = 1
            edges = np.flatnonzero(np.diff(np.concatenate([[0], chosen])))
            lengths.extend((edges[1::2] - edges[::2]).tolist())
        runs[name] = np.mean(lengths)
    assert runs["word"] < 1.3 and runs["4gram"] > 3.0
    probs = MaskingConfig(strategy="span").unit_length_probs()
    assert len(probs) == 10 and abs((np.arange(1, 11) * probs).sum() - 3.8) < 0.1  # SpanBERT


def synonym_setup():
    # Row 0: length-2 words -> two candidates; row 1: length-3 words -> one candidate.
    table = SynonymTable(np.array([0, 4]), np.array([2, 1], np.int32), np.array([2, 3], np.int32),
                         np.array([600, 601, 602, 603, 610, 611, 612], np.int32), ["甲乙", "丙丁戊"])
    return table, {2: 0, 3: 1}


def test_synonym_has_the_same_length_and_comes_from_the_words_row():
    rng = np.random.default_rng(6)
    table, rows = synonym_setup()
    tokens, start, content, syn, word_id = word_batch(rng, synonym_rows=rows)
    cfg = MaskingConfig(mask_prob=0.0, keep_prob=0.0, random_prob=0.0, synonym_prob=1.0,
                        synonym_fallback="mask")
    m = masker(cfg, table)(tokens, start, content, syn, rng)
    actions, out, ids = m.actions.reshape(-1), m.input_ids.reshape(-1), word_id.reshape(-1)
    used = set()
    for w in np.unique(ids[actions != NONE]):
        where = np.flatnonzero(ids == w)
        replaced = out[where].tolist()
        if len(where) in (2, 3):
            assert (actions[where] == SYNONYM).all()
            assert replaced in table.candidates(rows[len(where)])
            used.add(tuple(replaced))
        else:  # no synonym: the documented fallback
            assert (actions[where] == MASK).all() and replaced == [MASK_ID] * len(where)
    assert used == {(600, 601), (602, 603), (610, 611, 612)}


def test_word_cut_at_the_row_edge_does_not_take_a_longer_synonym():
    table, _ = synonym_setup()
    tokens = np.array([[CLS, 30, SEP]])  # a length-2 word's row, but only one token is here
    m = masker(MaskingConfig(mask_prob=0, keep_prob=0, random_prob=0, synonym_prob=1,
                             synonym_fallback="keep"), table)(
        tokens, np.array([[0, 1, 0]], bool), np.array([[0, 1, 0]], bool),
        np.array([[-1, 0, -1]]), np.random.default_rng(0))
    assert m.actions[0, 1] == KEEP and m.input_ids[0, 1] == 30


def test_random_word_mode_swaps_in_a_whole_word_of_the_same_length():
    rng = np.random.default_rng(7)
    tokens, start, content, syn, word_id = word_batch(rng)
    words = {tuple(tokens.reshape(-1)[word_id.reshape(-1) == w])
             for w in np.unique(word_id[word_id >= 0])}
    cfg = MaskingConfig(mask_prob=0, keep_prob=0, random_prob=1.0, random_mode="word")
    m = masker(cfg)(tokens, start, content, syn, rng)
    ids, out = word_id.reshape(-1), m.input_ids.reshape(-1)
    replaced = np.unique(ids[m.actions.reshape(-1) == RANDOM])
    assert len(replaced) > 20
    for w in replaced:
        assert tuple(out[ids == w]) in words  # an existing word, as long as the original


def test_presets():
    assert MaskingConfig.preset("bert").strategy == "token"
    motian = MaskingConfig.preset("motian")
    assert motian.synonym_prob > 0 and motian.strategy == "ngram"
    assert MaskingConfig.preset("wwm", rate=0.2).rate == 0.2
    with pytest.raises(ValueError):
        MaskingConfig(mask_prob=0.9)
    with pytest.raises(ValueError):
        MaskingConfig.preset("xlnet")


def test_loader_masks_freshly_each_epoch_with_the_motian_preset(lexicon_data):
    data, vocab, row_of, table = lexicon_data
    cfg = LoaderConfig(seq_len=32, batch_size=4, masking=MaskingConfig.preset("motian"))
    loader = PackedLoader(data, vocab, cfg)
    steps = loader.steps_per_epoch
    batches = list(itertools.islice(loader.iter_numpy(), 2 * steps))
    kinds = np.concatenate([m.actions.reshape(-1) for _, m in batches])
    assert (kinds == SYNONYM).mean() > 0.03 and not (kinds == MASK).any()
    # Dynamic masking: the two epochs do not repeat each other's masks.
    epoch = [np.concatenate([m.mlm_labels for _, m in batches[e * steps:(e + 1) * steps]])
             for e in range(2)]
    assert len(epoch[0]) != len(epoch[1]) or not np.array_equal(epoch[0], epoch[1])
    checked = 0
    for arrays, m in batches:
        flat_out = m.input_ids.reshape(-1)
        syn_pos = np.flatnonzero(m.actions.reshape(-1) == SYNONYM)
        starts = syn_pos[m.word_starts.reshape(-1)[syn_pos]]
        acts, ws = m.actions.reshape(-1), m.word_starts.reshape(-1)
        for p in starts:
            n = 1
            while p + n < len(acts) and acts[p + n] == SYNONYM and not ws[p + n]:
                n += 1
            original = tuple(arrays["tokens"].reshape(-1)[p: p + n].tolist())
            assert list(flat_out[p: p + n]) in table.candidates(row_of[original])
            checked += 1
    assert checked > 20  # the synonym words above were really looked at


# --------------------------------------------------------------------------- real text


def real_batches(data, preset, n, seq_len=128, **overrides):
    cfg = LoaderConfig(seq_len=seq_len, batch_size=16, seed=11,
                       masking=MaskingConfig.preset(preset, **overrides))
    loader = PackedLoader(data, config=cfg)
    return loader, list(itertools.islice(loader.iter_numpy(), n))


def masked_runs(m):
    """Lengths (tokens) of the maximal runs of consecutive masked positions."""
    chosen = np.zeros(m.actions.shape[0] * (m.actions.shape[1] + 1), np.int8)
    rows, cols = np.nonzero(m.actions != NONE)
    chosen[rows * (m.actions.shape[1] + 1) + cols] = 1
    edges = np.flatnonzero(np.diff(np.concatenate([[0], chosen])))
    return edges[1::2] - edges[::2]


def test_real_text_whole_words_never_a_whole_run_of_characters(pd98_encoded):
    """transformers 5.x's offset-based whole-word mask treats a run of Chinese characters as
    one word (masked runs of ~47 tokens, whole examples masked). motian masks jieba words."""
    _, batches = real_batches(pd98_encoded, "wwm", 12)
    runs, fully_masked = [], 0
    for arrays, m in batches:
        runs.extend(masked_runs(m).tolist())
        content = (arrays["attention_mask"] > 0) & (arrays["tokens"] > 4)
        fully_masked += int(((m.actions != NONE) | ~content).all(1).sum())
        flat_ws = m.word_starts.reshape(-1)
        chosen = np.zeros(m.actions.size, bool)
        chosen[m.mlm_positions] = True
        # Whole jieba words: a masked token's word start is masked, and so is the next token
        # when it continues the same word.
        nxt = np.append(chosen[1:], False) | ~np.append(content.reshape(-1)[1:], False)
        assert (nxt | ~chosen | np.append(flat_ws[1:], True)).all()
        prev = np.concatenate([[False], chosen[:-1]])
        assert (prev | ~chosen | flat_ws).all()  # and a masked piece's word start is masked
    assert fully_masked == 0
    assert np.mean(runs) < 3.0 and max(runs) < 20


@pytest.mark.parametrize("preset", ["bert", "wwm", "spanbert", "motian"])
def test_real_text_mask_rate_within_tolerance(pd98_encoded, preset):
    _, batches = real_batches(pd98_encoded, preset, 20)
    masked = sum(len(m.mlm_positions) for _, m in batches)
    content = sum(int(((a["attention_mask"] > 0) & (a["tokens"] > 4)).sum()) for a, _ in batches)
    assert abs(masked / content - 0.15) < 0.01, masked / content
    assert all(np.bincount(m.mlm_positions // 128, minlength=16).min() >= 1 for _, m in batches)


def test_real_text_synonyms_come_from_the_words_cilin_group(pd98_encoded):
    from motian.data.synonyms import candidates_by_word, parse_cilin

    cilin = candidates_by_word(parse_cilin())
    loader, batches = real_batches(pd98_encoded, "motian", 6)
    checked = 0
    for arrays, m in batches:
        acts, ws = m.actions.reshape(-1), m.word_starts.reshape(-1)
        original, shown = arrays["tokens"].reshape(-1), m.input_ids.reshape(-1)
        for p in np.flatnonzero((acts == SYNONYM) & ws):
            q = p + 1
            while q < len(acts) and acts[q] == SYNONYM and not ws[q]:
                q += 1
            word = "".join(loader.vocab[t] for t in original[p:q])
            synonym = "".join(loader.vocab[t] for t in shown[p:q])
            assert len(synonym) == len(word) and synonym != word
            assert synonym in cilin[word], (word, synonym)
            checked += 1
    assert checked > 50


def test_inspect_batch_shows_words_phrases_and_synonyms(pd98_encoded, capsys):
    import re

    from motian.cli import main

    assert main(["inspect-batch", "--data", str(pd98_encoded), "--examples", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\{[^{}⇒]+⇒[^{}]+\}", out)  # a synonym replacement
    assert re.search(r"\[[^\[\]→]{2,}→[^\[\]]+\]", out)  # a multi-character word replaced
    assert re.search(r"[\]}][\[{]", out)  # two masked words side by side: a phrase
    assert main(["inspect-batch", "--data", str(pd98_encoded), "--preset", "wwm",
                 "--examples", "2"]) == 0
    assert "■■" in capsys.readouterr().out  # [MASK] over a whole two-character word
