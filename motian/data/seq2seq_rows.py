"""Row formats of the generation objectives, made from packed rows (vectorised numpy).

* `unilm_rows` (UNILM, Dong et al. 2019, arXiv:1905.03197): every row draws its attention
  mode (bidirectional, seq2seq, left-to-right, right-to-left; motian.model.masks) with the
  recipe's shares, *per row* rather than per batch, so every step's gradient mixes all four
  language models (the paper alternates them "within one training batch"; per row also keeps
  a step's data independent of how the global batch is split into micro-batches). A seq2seq
  row is cut in two consecutive spans of its text: the source (segment 0) is the first 25-75%
  of the row's real tokens, drawn uniformly, the target (segment 1) the rest. The cloze masks
  of the loader's masker fall on both segments, as in the paper.
* `mass_rows` (MASS, Song et al. 2019, arXiv:1905.02450): one contiguous fragment of
  round(span x tokens) of each row's text (after [CLS]), at a uniform start, is replaced by
  [MASK] in the encoder input; the decoder is fed the row with every token *not* in the
  fragment replaced by [MASK] and the fragment shifted right by one (its first input is
  [MASK]), as in the paper's Figure 1 and section 2.2, and predicts the fragment only.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def unilm_rows(attention_mask: np.ndarray, shares: tuple[float, ...],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`unilm_mode` (B,) mode ids drawn with `shares`, `source_length` (B,) for seq2seq rows
    (0 elsewhere) and the rows' `token_type_ids` (B, L) (1 on a seq2seq target)."""
    B, L = attention_mask.shape
    p = np.asarray(shares, dtype=np.float64)
    modes = rng.choice(len(p), size=B, p=p / p.sum())
    real = attention_mask.sum(1)  # (B,) real tokens, [CLS] included
    source = np.rint(real * rng.uniform(0.25, 0.75, size=B)).astype(np.int64)
    source = np.clip(source, 1, np.maximum(real - 1, 1))
    source = np.where(modes == 1, source, 0)  # 1 = seq2seq (motian.model.masks.SEQ2SEQ)
    j = np.arange(L)[None, :]
    types = ((modes == 1)[:, None] & (j >= source[:, None]) & (attention_mask > 0))
    return {"unilm_mode": modes.astype(np.int64), "source_length": source,
            "token_type_ids": types.astype(np.int64)}


def mass_rows(tokens: np.ndarray, attention_mask: np.ndarray, span: float, mask_id: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The encoder input `mass_input_ids`, `decoder_input_ids` and `decoder_labels` (-100
    outside the fragment), all (B, L), from unmasked `tokens` (B, L) with [CLS] first."""
    B, L = tokens.shape
    text = np.maximum(attention_mask.sum(1) - 1, 1)  # (B,) tokens after [CLS]
    length = np.clip(np.rint(span * text).astype(np.int64), 1, text)
    start = 1 + (rng.random(B) * (text - length + 1)).astype(np.int64)
    j = np.arange(L)[None, :]
    fragment = (j >= start[:, None]) & (j < (start + length)[:, None]) & (attention_mask > 0)
    shifted = np.zeros_like(tokens)
    shifted[:, 1:] = tokens[:, :-1]
    after = np.zeros_like(fragment)
    after[:, 1:] = fragment[:, :-1]
    after &= fragment  # position i reads token i-1 when both are in the fragment
    return {"mass_input_ids": np.where(fragment, mask_id, tokens),
            "decoder_input_ids": np.where(after, shifted, mask_id),
            "decoder_labels": np.where(fragment, tokens, IGNORE)}
