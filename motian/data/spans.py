"""Span boundary targets for SpanBERT's span boundary objective (SBO; Joshi et al. 2020,
"SpanBERT: Improving Pre-training by Representing and Predicting Spans", arXiv:1907.10529).

SBO predicts each masked token x_i of a span (s..e) from the encoder outputs at the two boundary
tokens x_{s-1} and x_{e+1} and the token's position in the span. This module turns the masker's
compact labels (sorted flat positions into the (B, L) grid) into, for every masked token, the
flat positions of its span's boundaries and its offset in the span, with numpy only.

**What a span is here.** A span is a maximal run of consecutive masked positions within one
row. The masker picks spans of whole words (``strategy="span"``); two picked spans that happen
to touch become one run, so a boundary is always a token the model reads unmasked (the point of
the objective: predict the span from what surrounds it).

**Row edges.** The left boundary always lies in the row (column 0 holds [CLS], never masked). A
span that ends at the last column of a row (a packed row cut mid-document) has no right
neighbour in the row; its right boundary is the nearest in-row position, the span's own last
token. So every masked token keeps an SBO target and the SBO loss averages over exactly the
tokens the MLM loss does (one count for both; dropping those spans would leave SBO with its own,
smaller count). [CLS] and [SEP] serve as boundaries where a span touches them, as in SpanBERT.
"""

from __future__ import annotations

import numpy as np


def span_boundaries(positions: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """For masked `positions` (N,) (flat, strictly increasing, into rows of `seq_len`):
    ``sbo_left`` and ``sbo_right`` (N,) the flat positions of the span's boundary tokens and
    ``sbo_offset`` (N,) the token's 0-based position in its span (see the module docstring)."""
    p = np.asarray(positions, dtype=np.int64)
    if len(p) == 0:
        empty = np.zeros(0, np.int64)
        return {"sbo_left": empty, "sbo_right": empty.copy(), "sbo_offset": empty.copy()}
    if np.any(np.diff(p) <= 0):
        raise ValueError("span_boundaries needs strictly increasing masked positions (the "
                         "masker's order)")
    L = int(seq_len)
    row = p // L
    starts_span = np.ones(len(p), dtype=bool)
    starts_span[1:] = (p[1:] != p[:-1] + 1) | (row[1:] != row[:-1])
    span = np.cumsum(starts_span) - 1  # (N,) span index of each token
    first_index = np.flatnonzero(starts_span)  # (S,)
    last_index = np.append(first_index[1:], len(p)) - 1
    first, last = p[first_index][span], p[last_index][span]  # (N,) each
    row_start = row * L
    left = np.maximum(first - 1, row_start)
    right = np.minimum(last + 1, row_start + L - 1)
    return {"sbo_left": left, "sbo_right": right, "sbo_offset": p - first}
