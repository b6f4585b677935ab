"""Masked-LM masking: which tokens the model must predict and what it sees in their place.

Owns `MaskingConfig` (strategy, budget, replacement probabilities, presets) and `Masker`, which
masks a whole batch at once with numpy: no Python loop over tokens or words on the hot path
(the only loops run over word *lengths*, a handful of iterations per batch).

How a batch is masked (B rows, L positions; the loader calls this fresh for every batch, so each
epoch sees new masks: RoBERTa's dynamic masking):

1. **Words.** Word starts come from the encoded shards (bit 0 of the flags: jieba words aligned
   to tokens). A content token also starts a word when the token before it is not content
   ([CLS], [SEP], padding), so a word cut at a row or document edge becomes a word of its own.
   With ``strategy="token"`` every token is a word (BERT).
2. **Units.** A unit is what gets chosen as one piece: a word (``whole_word``), an n-gram of 1-4
   words with probabilities 40/30/20/10 (``ngram``, MacBERT's phrase masking), or a span of
   words whose length follows a geometric law (p=0.2) truncated at 10 and renormalised
   (``span``, SpanBERT, mean 3.8 words). Each row is cut into consecutive units of random
   lengths; because units are then picked uniformly, the lengths of *picked* units follow the
   configured law.
   **Entities** (ERNIE 1.0's knowledge masking, ``entity_prob`` > 0; the shards must be
   encoded with ``--entities``): each named entity is one word of its own (its tokens merged,
   whatever jieba cut inside it) and one unit of its own, and the word and phrase units are
   cut from the words around it. Units are then picked in a random order in which each next
   pick is an entity with probability ``entity_prob`` while the row still has entities left
   (an exponential race: entity and other units arrive at rates ``entity_prob`` and
   ``1 - entity_prob``), so an entity is masked whole or not at all.
3. **Budget.** A row with n content tokens gets ``budget = max(1, round(rate * n))`` tokens.
   Units are visited in random order, word by word; a word is taken while the tokens taken
   before it are fewer than the budget, and the word that crosses the budget is taken only if
   that lands nearer the budget than stopping (ties and the row's first word are always taken).
   So a row is never over its budget by more than one word, never under it by more than one
   word, the mean rate is unbiased, and every row with content has at least one masked token
   (an empty mask makes the MLM loss NaN). A unit cut by the budget keeps its first words.
4. **Replacement, once per word** (UER-py decided per character, which leaks the word): each
   chosen word draws one action: [MASK] on all its tokens, a random replacement, keep, or a
   synonym. Random replacement is per token from the vocabulary (``random_mode="token"``,
   BERT) or a whole random word of the same token length taken from the batch, so it follows
   the corpus' word frequencies (``"word"``). A synonym is a same-length candidate from the
   word's HIT Cilin row of the `SynonymTable` (MacBERT's similar-word masking), drawn uniformly
   or, with ``synonym_weighting="frequency"``, in proportion to shared Cilin groups times
   (jieba dictionary count + 1) ** ``synonym_alpha``; a word with no usable synonym (none in
   Cilin, or cut at the row edge) falls back to ``synonym_fallback``.
5. **Labels** are compact: flat positions into the (B*L) grid and the original ids there, so
   the model computes its output layer on masked positions only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from motian.data.shards import SynonymTable

Strategy = Literal["token", "whole_word", "ngram", "span"]
Preset = Literal["bert", "wwm", "spanbert", "motian", "ernie"]
# Per-token action codes (`MaskedBatch.actions`), for inspection and tests.
NONE, MASK, RANDOM, KEEP, SYNONYM = 0, 1, 2, 3, 4
ACTION_NAMES = {MASK: "mask", RANDOM: "random", KEEP: "keep", SYNONYM: "synonym"}


@dataclass(frozen=True)
class MaskingConfig:
    """What the model is asked to predict. See the module docstring for the exact rules."""

    strategy: Strategy = "whole_word"
    rate: float = 0.15  # mask budget as a fraction of the content tokens of each row
    ngram_probs: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)  # P(n = 1, 2, 3, 4 words)
    span_p: float = 0.2  # SpanBERT geometric parameter
    span_max: int = 10  # longest span, in words
    # Replacement of a chosen word: probabilities of [MASK] / random / keep / synonym.
    mask_prob: float = 0.8
    random_prob: float = 0.1
    keep_prob: float = 0.1
    synonym_prob: float = 0.0
    random_mode: Literal["token", "word"] = "token"
    synonym_fallback: Literal["mask", "random", "keep"] = "mask"
    # Which candidate of the word's Cilin row a synonym replacement takes: "uniform" (each
    # alike), or "frequency": candidate c with weight groups(c) * (freq(c) + 1) ** synonym_alpha,
    # groups = Cilin groups c shares with the word, freq = c's count in jieba's dictionary
    # (see `SynonymTable`). alpha 0 weighs by shared groups only; larger alpha favours common
    # words more (1 = in proportion to their counts).
    synonym_weighting: Literal["uniform", "frequency"] = "uniform"
    synonym_alpha: float = 0.5
    # ERNIE 1.0: the share of picked units that are named entities (while a row has any);
    # 0 = entities are ordinary words. Needs shards encoded with --entities.
    entity_prob: float = 0.0

    def __post_init__(self) -> None:
        e = self.entity_prob
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e <= 1:
            raise ValueError(f"entity_prob must be a number from 0 to 1 (the share of masked "
                             f"units that are named entities), got {e!r}")
        if self.synonym_weighting not in ("uniform", "frequency"):
            raise ValueError(f"synonym_weighting must be 'uniform' or 'frequency', got "
                             f"{self.synonym_weighting!r}")
        alpha = self.synonym_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not 0 <= alpha <= 4:
            raise ValueError(f"synonym_alpha must be a number from 0 to 4 (the power of a "
                             f"candidate's frequency in its weight), got {alpha!r}")
        probs = (self.mask_prob, self.random_prob, self.keep_prob, self.synonym_prob)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"mask/random/keep/synonym probabilities must be >= 0 and sum to 1, "
                             f"got {probs}")
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"masking rate must be in (0, 1), got {self.rate}")
        if self.strategy == "ngram" and (min(self.ngram_probs) < 0 or sum(self.ngram_probs) <= 0):
            raise ValueError(f"ngram_probs must be >= 0 with a positive sum: {self.ngram_probs}")
        if self.strategy == "span" and not (0 < self.span_p <= 1 and self.span_max >= 1):
            raise ValueError("span masking needs 0 < span_p <= 1 and span_max >= 1")

    @classmethod
    def preset(cls, name: Preset, **overrides) -> MaskingConfig:
        """Named recipes; keyword arguments override single fields."""
        presets = {
            # BERT: single tokens, 80% [MASK] / 10% random token / 10% unchanged.
            "bert": cls(strategy="token"),
            # Chinese BERT-wwm: the same replacement, whole jieba words chosen together.
            "wwm": cls(strategy="whole_word"),
            # SpanBERT: geometric spans of whole words, BERT's replacement per span word.
            "spanbert": cls(strategy="span"),
            # Motian (MacBERT-style): words and 1-4-word phrases; a chosen word becomes a
            # same-length Cilin synonym instead of [MASK] (no [MASK] token the fine-tuned model
            # never sees), a random same-length word when it has no synonym, else kept.
            # Synonyms stay drawn uniformly: frequency weighting halves the rare synonyms but
            # showed no consistent held-out gain over 5 seeds (docs/batches.md, "Which
            # synonym"); set synonym_weighting="frequency" to draw by the report's distribution.
            "motian": cls(strategy="ngram", mask_prob=0.0, random_prob=0.1, keep_prob=0.1,
                          synonym_prob=0.8, random_mode="word", synonym_fallback="random"),
            # ERNIE 1.0 (Sun et al. 2019): basic (word), phrase and entity-level units mixed in
            # one run (the paper trains the levels in stages; here a third of the picked units
            # are entities, the rest words and 2-4-word phrases by MacBERT's law), BERT's
            # 80/10/10 replacement. The shards need `motian encode --entities`.
            "ernie": cls(strategy="ngram", entity_prob=1 / 3),
        }
        if name not in presets:
            raise ValueError(f"unknown masking preset {name!r}; choose one of {sorted(presets)}")
        return replace(presets[name], **overrides)

    def unit_length_probs(self) -> np.ndarray:
        """P(unit = k words) for k = 1..K under this strategy."""
        if self.strategy == "ngram":
            p = np.asarray(self.ngram_probs, dtype=np.float64)
        elif self.strategy == "span":
            k = np.arange(self.span_max)
            p = self.span_p * (1 - self.span_p) ** k
        else:
            p = np.ones(1)
        return p / p.sum()


@dataclass
class MaskedBatch:
    """The result of masking one (B, L) batch."""

    input_ids: np.ndarray  # int64 (B, L): what the model reads
    mlm_positions: np.ndarray  # int64 (N,): flat indices into the B*L positions
    mlm_labels: np.ndarray  # int64 (N,): original token ids at those positions
    actions: np.ndarray  # int8 (B, L): NONE/MASK/RANDOM/KEEP/SYNONYM per token
    word_starts: np.ndarray  # bool (B, L): the word starts masking used


@dataclass
class Masker:
    """Masks batches with `config`. `random_ids` are the ids a random token may take."""

    config: MaskingConfig
    mask_id: int
    random_ids: np.ndarray
    synonyms: SynonymTable = field(default_factory=SynonymTable.empty)

    def __post_init__(self) -> None:
        self._unit_probs = self.config.unit_length_probs()
        c = self.config
        self._action_cdf = np.cumsum([c.mask_prob, c.random_prob, c.keep_prob, c.synonym_prob])
        self._fallback = {"mask": MASK, "random": RANDOM, "keep": KEEP}[c.synonym_fallback]
        self.random_ids = np.asarray(self.random_ids, dtype=np.int64)
        self._synonym_key = None  # None: uniform draw (see `_replace`)
        if c.synonym_weighting != "uniform" and c.synonym_prob > 0 and len(self.synonyms.count):
            if self.synonyms.weighted:
                self._synonym_key = synonym_draw_key(self.synonyms, c.synonym_alpha)
                self._synonym_offsets = self.synonyms.offsets()
            else:
                warnings.warn("the synonym table (synonyms.npz) was written by an older motian "
                              "without candidate weights, so synonym_weighting="
                              f"{c.synonym_weighting!r} draws synonyms uniformly; run `motian "
                              "encode` again to add the weights", stacklevel=2)

    def __call__(self, tokens: np.ndarray, word_start: np.ndarray, content: np.ndarray,
                 synonym_rows: np.ndarray, rng: np.random.Generator,
                 entity_start: np.ndarray | None = None,
                 in_entity: np.ndarray | None = None) -> MaskedBatch:
        """Mask a batch.

        Args:
            tokens: (B, L) token ids.
            word_start: (B, L) bool, bit 0 of the shard flags.
            content: (B, L) bool, True for text tokens that may be masked (not [CLS], [SEP],
                padding).
            synonym_rows: (B, L) int, the shards' synonym row at word starts, -1 elsewhere.
            rng: the batch's generator (the loader derives it from seed, epoch and position).
            entity_start, in_entity: (B, L) bool, bits 3 and 4 of the shard flags; needed
                (and read) only with ``entity_prob`` > 0.
        """
        B, L = tokens.shape
        flat = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        content = content.astype(bool, copy=False)
        prev_content = np.zeros_like(content)
        prev_content[:, 1:] = content[:, :-1]
        starts = content if self.config.strategy == "token" else \
            content & (word_start.astype(bool, copy=False) | ~prev_content)
        inside = None
        if self.config.entity_prob > 0:
            if in_entity is None or entity_start is None:
                raise ValueError("entity_prob > 0 needs the entity flags of the shards")
            # An entity is one word: its first token (or its first in the row) starts it, the
            # others do not; encode made the token after it start a word.
            inside = in_entity.astype(bool, copy=False) & content
            starts = (starts & ~inside) | (inside & (entity_start.astype(bool, copy=False)
                                                     | ~prev_content))
        words = _word_table(starts, content)
        is_entity = None if inside is None else inside.reshape(-1)[words.pos]
        chosen = self._choose_words(words, content.sum(1), rng, is_entity)
        # Token -> its word (-1 outside words) -> chosen?
        tok_word = np.cumsum(starts.reshape(-1)) - 1
        tok_word[~content.reshape(-1)] = -1
        tok_chosen = np.zeros(B * L, dtype=bool)
        inside = tok_word >= 0
        tok_chosen[inside] = chosen[tok_word[inside]]

        word_action = self._word_actions(words, chosen, synonym_rows.reshape(-1), rng)
        actions = np.zeros(B * L, dtype=np.int8)
        actions[tok_chosen] = word_action[tok_word[tok_chosen]]
        out = flat.copy()
        self._replace(out, flat, actions, words, word_action, synonym_rows.reshape(-1), rng)
        positions = np.flatnonzero(tok_chosen)
        return MaskedBatch(out.reshape(B, L), positions, flat[positions], actions.reshape(B, L),
                           starts)

    # ------------------------------------------------------------------ choosing words

    def _choose_words(self, words: _Words, n_content: np.ndarray, rng: np.random.Generator,
                      is_entity: np.ndarray | None = None) -> np.ndarray:
        """Bool (W,): the words to mask, by the budget rule of the module docstring;
        `is_entity` (W,) marks entity words (each a unit of its own, picked by the race)."""
        W = len(words.pos)
        if W == 0:
            return np.zeros(0, dtype=bool)
        unit_start = words.first_in_row.copy()
        if len(self._unit_probs) > 1:
            # Cut the batch's word sequence into units of random lengths; row starts also cut.
            sizes = rng.choice(len(self._unit_probs), size=W, p=self._unit_probs) + 1
            ends = np.cumsum(sizes)
            unit_start[ends[ends < W]] = True
        else:
            unit_start[:] = True
        if is_entity is not None:  # an entity is a unit alone: cut before and after it
            unit_start |= is_entity
            unit_start[1:] |= is_entity[:-1]
        unit = np.cumsum(unit_start) - 1
        if is_entity is None:
            key = rng.random(unit[-1] + 1)[unit]
            # Visit order: by row, then unit in random order, then word order within the unit
            # (stable sort keeps index order among equal keys). Keys are < 1, so row + key
            # sorts rows first.
            order = np.argsort(words.row + key, kind="stable")
        else:
            key = self._entity_race(words.row[unit_start], is_entity[unit_start], rng)[unit]
            order = np.lexsort((np.arange(W), key, words.row))
        lens = words.length[order]
        before = np.cumsum(lens) - lens
        # Rows are contiguous in both orders, so the row's first entry gives its offset. A row
        # without words (e.g. a last packed row holding only [CLS] [SEP]) has no entry, so rows
        # are numbered among those that have words, not by their index in the batch.
        row_first = np.flatnonzero(words.first_in_row)
        row_rank = np.cumsum(words.first_in_row) - 1
        taken_before = before - before[row_first][row_rank]
        budget = np.maximum(1, np.floor(self.config.rate * n_content + 0.5)).astype(np.int64)
        b = budget[words.row]
        after = taken_before + lens
        take = (taken_before < b) & ((after <= b) | (after - b <= b - taken_before)
                                     | (taken_before == 0))
        chosen = np.empty(W, dtype=bool)
        chosen[order] = take
        return chosen

    def _entity_race(self, row: np.ndarray, entity: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """Float (U,): each unit's arrival time in a race where, per row, entity units arrive
        at rate p = entity_prob and the others at rate 1 - p, each kind in a random order.
        Memorylessness makes the next arrival an entity with probability p whenever both kinds
        remain, so visiting units by time picks entities in the configured share."""
        p = self.config.entity_prob
        rate = np.where(entity, max(p, 1e-9), max(1.0 - p, 1e-9))
        group = row * 2 + entity
        perm = np.lexsort((rng.random(len(row)), group))  # grouped, random order within
        gaps = rng.exponential(size=len(row)) / rate[perm]
        total = np.cumsum(gaps)
        g = group[perm]
        first = np.ones(len(g), dtype=bool)
        first[1:] = g[1:] != g[:-1]
        before_group = (total - gaps)[first][np.cumsum(first) - 1]
        times = np.empty(len(row))
        times[perm] = total - before_group
        return times

    # ------------------------------------------------------------------ replacement

    def _word_actions(self, words: _Words, chosen: np.ndarray, syn_flat: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        """Int8 (W,): one action per word (NONE for words not chosen)."""
        action = (np.searchsorted(self._action_cdf, rng.random(len(chosen)) * self._action_cdf[-1],
                                  side="right") + 1).astype(np.int8)
        action = np.minimum(action, SYNONYM)  # guards u * total == total
        wants = action == SYNONYM
        if wants.any():
            usable = self._synonym_usable(words, syn_flat)
            action[wants & ~usable] = self._fallback
        action[~chosen] = NONE
        return action

    def _synonym_usable(self, words: _Words, syn_flat: np.ndarray) -> np.ndarray:
        """Bool (W,): the word has a Cilin row whose candidates are as long as the word here
        (a word cut at the row edge is shorter than its synonyms and cannot use them)."""
        table = self.synonyms
        row = syn_flat[words.pos].astype(np.int64)
        ok = (row >= 0) & (row < len(table.count))
        safe = np.where(ok, row, 0)
        if len(table.count) == 0:
            return np.zeros(len(row), dtype=bool)
        return ok & (table.length[safe] == words.length) & (table.count[safe] > 0)

    def _replace(self, out: np.ndarray, flat: np.ndarray, actions: np.ndarray, words: _Words,
                 word_action: np.ndarray, syn_flat: np.ndarray, rng: np.random.Generator) -> None:
        out[actions == MASK] = self.mask_id
        rand_words = np.flatnonzero(word_action == RANDOM)
        if len(rand_words) and self.config.random_mode == "token":
            where = np.flatnonzero(actions == RANDOM)
            out[where] = self.random_ids[rng.integers(len(self.random_ids), size=len(where))]
        elif len(rand_words):
            # A random word of the same token length, drawn from all words of the batch.
            by_len = np.argsort(words.length, kind="stable")
            sorted_len = words.length[by_len]
            need = words.length[rand_words]
            lo = np.searchsorted(sorted_len, need, side="left")
            hi = np.searchsorted(sorted_len, need, side="right")
            pick = by_len[lo + (rng.random(len(need)) * (hi - lo)).astype(np.int64)]
            _copy_words(out, words.pos[rand_words], flat, words.pos[pick], need)
        syn_words = np.flatnonzero(word_action == SYNONYM)
        if len(syn_words):
            t = self.synonyms
            row = syn_flat[words.pos[syn_words]].astype(np.int64)
            # One uniform number per word either way, so both draws use the generator alike.
            u = rng.random(len(row))
            if self._synonym_key is None:
                j = (u * t.count[row]).astype(np.int64)
            else:
                # Row r's keys are r + its candidates' cumulative probabilities, so the first
                # key above r + u is candidate j with probability weight_j / row total.
                k = np.searchsorted(self._synonym_key, row + u, side="right")
                j = np.clip(k - self._synonym_offsets[row], 0, t.count[row] - 1)
            n = t.length[row].astype(np.int64)
            _copy_words(out, words.pos[syn_words], t.tokens.astype(np.int64, copy=False),
                        t.start[row] + j * n, n)


def synonym_draw_key(table: SynonymTable, alpha: float) -> np.ndarray:
    """float64 (count.sum(),): for candidate j of row r, r + the probability of candidates 0..j
    of the row, with weights groups * (freq + 1) ** alpha (`MaskingConfig.synonym_weighting`).
    Sorted, so one `searchsorted` draws a weighted candidate for every word of a batch.

    The cumulative sums run per row (a loop over candidate positions, at most a few dozen),
    not as one cumulative sum over the whole table, whose rounding would grow with the row
    index; each row's last key is then exactly r + 1.
    """
    w = table.groups.astype(np.float64) * (table.freq.astype(np.float64) + 1.0) ** alpha
    count, offsets = table.count.astype(np.int64), table.offsets()
    within = np.empty_like(w)
    running = np.zeros(len(count))
    for j in range(int(count.max(initial=0))):
        rows = np.flatnonzero(count > j)
        running[rows] += w[offsets[rows] + j]
        within[offsets[rows] + j] = running[rows]
    row_of = np.repeat(np.arange(len(count)), count)
    return row_of + within / running[row_of]


@dataclass
class _Words:
    """The words of a batch in reading order (W of them), as flat arrays."""

    pos: np.ndarray  # int64 (W,): flat position of the word's first token
    length: np.ndarray  # int64 (W,): tokens in the word
    row: np.ndarray  # int64 (W,): batch row
    first_in_row: np.ndarray  # bool (W,): first word of its row


def _word_table(starts: np.ndarray, content: np.ndarray) -> _Words:
    B, L = starts.shape
    pos = np.flatnonzero(starts.reshape(-1))
    word_of_tok = np.cumsum(starts.reshape(-1)) - 1
    length = np.bincount(word_of_tok[content.reshape(-1)], minlength=len(pos)).astype(np.int64)
    row = pos // L
    first = np.ones(len(pos), dtype=bool)
    first[1:] = row[1:] != row[:-1]
    return _Words(pos, length, row, first)


def _copy_words(out: np.ndarray, dst: np.ndarray, src_array: np.ndarray, src: np.ndarray,
                length: np.ndarray) -> None:
    """out[dst[i] + k] = src_array[src[i] + k] for k < length[i]; loops over k only."""
    for k in range(int(length.max(initial=0))):
        m = length > k
        out[dst[m] + k] = src_array[src[m] + k]
