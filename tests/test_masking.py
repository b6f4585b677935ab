"""Masking: the known mistakes of the field, each as a test that fails if it comes back."""

from __future__ import annotations

import itertools
from dataclasses import replace

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


# ---------------------------------------------------------------- weighted synonym draws


def chi2_limit(df: int, z: float = 3.29) -> float:
    """Upper critical value of chi-square with `df` degrees of freedom at the normal quantile
    `z` (3.29: p = 0.0005), by the Wilson-Hilferty approximation (no scipy needed)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def synonym_draws(table, rows, config, batches=120, seed=5, tok=None):
    """Mask batches whose words all have synonyms (two-token words of `rows`, cycled) and count,
    per row, how often each candidate was drawn. Returns {row: counts (count[row],)}."""
    rng = np.random.default_rng(seed)
    B, L = 32, 128
    n_words = (L - 2) // 2
    word_rows = np.resize(np.asarray(rows), B * n_words).reshape(B, n_words)
    tokens = np.full((B, L), SEP, np.int64)
    tokens[:, 0] = CLS
    start = np.zeros((B, L), bool)
    syn = np.full((B, L), -1, np.int64)
    cols = 1 + 2 * np.arange(n_words)
    start[:, cols] = True
    syn[:, cols] = word_rows
    for r in rows:  # the word's own tokens (any tokens would do: the row decides the draw)
        own = tok.encode(table.words[r], add_special_tokens=False).ids
        b, k = np.nonzero(word_rows == r)
        tokens[b, cols[k]], tokens[b, cols[k] + 1] = own
    content = np.zeros((B, L), bool)
    content[:, 1: 1 + 2 * n_words] = True
    m = masker(config, table)
    index = {r: {tuple(c): j for j, c in enumerate(table.candidates(r))} for r in rows}
    counts = {r: np.zeros(int(table.count[r]), np.int64) for r in rows}
    for _ in range(batches):
        out = m(tokens, start, content, syn, rng)
        b, c = np.nonzero((out.actions == SYNONYM) & start)
        for bi, ci in zip(b, c):
            r = int(syn[bi, ci])
            counts[r][index[r][tuple(out.input_ids[bi, ci: ci + 2])]] += 1
    return counts


@pytest.fixture(scope="module")
def real_table(pd98_encoded):
    """The weighted synonym table `motian encode` wrote for real text, its tokenizer, and three
    two-token rows with at least 4 candidates of clearly unequal weights."""
    from motian.data.shards import EncodedDataset
    from motian.data.tokenizer import load_tokenizer

    table = EncodedDataset(pd98_encoded).synonyms()
    assert table.weighted
    off = table.offsets()
    rows = [r for r in range(len(table.words))
            if table.length[r] == 2 and table.count[r] >= 4
            and np.ptp(np.log1p(table.freq[off[r]: off[r] + table.count[r]])) > 3][:3]
    assert len(rows) == 3
    return table, rows, load_tokenizer(pd98_encoded / "vocab.txt")


def expected_probs(table, r, alpha):
    s = table.offsets()[r]
    w = table.groups[s: s + table.count[r]] * (table.freq[s: s + table.count[r]] + 1.0) ** alpha
    return w / w.sum()


def chi2(counts, probs):
    exp = counts.sum() * probs
    return float(((counts - exp) ** 2 / exp).sum())


SYN_ONLY = dict(mask_prob=0.0, random_prob=0.0, keep_prob=0.0, synonym_prob=1.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_weighted_synonym_draws_follow_the_weights(real_table, alpha):
    table, rows, tok = real_table
    cfg = MaskingConfig(**SYN_ONLY, synonym_weighting="frequency", synonym_alpha=alpha)
    counts = synonym_draws(table, rows, cfg, tok=tok)
    uniform = synonym_draws(table, rows, MaskingConfig(**SYN_ONLY), tok=tok)
    for r in rows:
        probs, k = expected_probs(table, r, alpha), int(table.count[r])
        assert counts[r].sum() > 8000, counts[r].sum()
        assert chi2(counts[r], probs) < chi2_limit(k - 1), (table.words[r], counts[r], probs)
        # the test has power: uniform draws fail it, and pass their own expectation
        assert chi2(uniform[r], probs) > 10 * chi2_limit(k - 1)
        assert chi2(uniform[r], np.full(k, 1 / k)) < chi2_limit(k - 1)
        # the most common candidate is drawn most
        assert np.argmax(counts[r]) == np.argmax(probs)


def test_weighting_changes_only_which_synonym_and_is_deterministic(real_table):
    table, rows, tok = real_table
    rng = np.random.default_rng(3)
    tokens, start, content, syn, _ = word_batch(rng, B=32, synonym_rows={2: rows[0]})
    motian = MaskingConfig.preset("motian", synonym_weighting="uniform")
    weighted = replace(motian, synonym_weighting="frequency", synonym_alpha=1.0)
    u = masker(motian, table)(tokens, start, content, syn, np.random.default_rng(9))
    w1 = masker(weighted, table)(tokens, start, content, syn, np.random.default_rng(9))
    w2 = masker(weighted, table)(tokens, start, content, syn, np.random.default_rng(9))
    for name in ("input_ids", "mlm_positions", "mlm_labels", "actions"):
        assert np.array_equal(getattr(w1, name), getattr(w2, name)), name  # same rng, same mask
    # Both draws take one number per word, so every other decision is the same.
    for name in ("mlm_positions", "mlm_labels", "actions"):
        assert np.array_equal(getattr(u, name), getattr(w1, name)), name
    syn_pos = u.actions == SYNONYM
    assert syn_pos.sum() > 30
    assert np.array_equal(u.input_ids[~syn_pos], w1.input_ids[~syn_pos])
    assert not np.array_equal(u.input_ids[syn_pos], w1.input_ids[syn_pos])


def test_uniform_ignores_the_weights(real_table):
    """"uniform" draws exactly as before the table had weights: the same masks from the table
    with and without them."""
    table, rows, tok = real_table
    bare = SynonymTable(table.start, table.count, table.length, table.tokens, table.words)
    rng = np.random.default_rng(4)
    tokens, start, content, syn, _ = word_batch(rng, B=32, synonym_rows={2: rows[1]})
    cfg = MaskingConfig.preset("motian", synonym_weighting="uniform")
    a = masker(cfg, table)(tokens, start, content, syn, np.random.default_rng(1))
    b = masker(cfg, bare)(tokens, start, content, syn, np.random.default_rng(1))
    assert np.array_equal(a.input_ids, b.input_ids) and (a.actions == SYNONYM).any()


def test_a_table_without_weights_draws_uniformly_with_a_warning(real_table):
    table, rows, tok = real_table
    bare = SynonymTable(table.start, table.count, table.length, table.tokens, table.words)
    cfg = MaskingConfig(**SYN_ONLY, synonym_weighting="frequency")
    with pytest.warns(UserWarning, match="without candidate weights.*motian encode"):
        counts = synonym_draws(bare, rows, cfg, batches=40, tok=tok)
    for r in rows:
        k = int(table.count[r])
        assert chi2(counts[r], np.full(k, 1 / k)) < chi2_limit(k - 1)


@pytest.mark.parametrize("bad, match", [
    ({"synonym_weighting": "zipf"}, "synonym_weighting must be 'uniform' or 'frequency'"),
    ({"synonym_alpha": -0.5}, "synonym_alpha must be a number from 0 to 4"),
    ({"synonym_alpha": "0.5"}, "synonym_alpha must be a number"),
])
def test_bad_synonym_weighting_settings_fail_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        MaskingConfig.preset("motian", **bad)
