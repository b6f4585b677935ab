"""The pretraining split of encoded shards: training documents vs the fixed held-out slice.

`SplitLoader` is a `PackedLoader` over the training documents or only the held-out ones (every
`holdout_every`-th document), so every recipe is evaluated on the same text and never trains on
it; `causal_batches` turns its packed rows into next-token batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.pairs import SentenceIndex
from motian.errors import UserError


class SplitLoader(PackedLoader):
    """`PackedLoader` over the training documents or only the held-out ones.

    Document d (numbered across shards in dataset order, empty ones included) is held out when
    ``d % holdout_every == holdout_every - 1``: a fixed, evenly spread slice that does not
    depend on the recipe, so every recipe is evaluated on the same text and never trains on it
    (in packed rows and in sentence-order pairs alike)."""

    def __init__(self, data: Path, config: LoaderConfig, holdout_every: int, held_out: bool):
        self._split = (holdout_every, held_out)  # read by _index_documents during __init__
        super().__init__(data, None, config)
        if self._sentences is not None:
            s, keep = self._sentences, self._keep(self._sentences.doc)
            self._sentences = SentenceIndex(s.shard[keep], s.doc[keep], s.start[keep],
                                            s.end[keep], s.offset[keep], s.doc_len[keep],
                                            s.n_docs)
            self._plan_cache = self._pairs_cache = None
            if len(self._sentences.start) == 0:
                side = "held-out" if held_out else "training"
                raise UserError(f"{data}: no sentence pairs in the {side} documents; use more "
                                "data or change eval.holdout_every")
            self._check_sizes(data)

    def _keep(self, doc_ids: np.ndarray) -> np.ndarray:
        every, held_out = self._split
        if every <= 0:
            return np.full(len(doc_ids), not held_out)
        return (doc_ids % every == every - 1) == held_out

    def _index_documents(self) -> None:
        super()._index_documents()
        ids, base = [], 0
        for shard in self.shards:
            docs = np.asarray(shard.docs, dtype=np.int64)
            ids.append(base + np.flatnonzero(np.diff(docs) > 0))  # the docs the parent kept
            base += len(docs) - 1
        keep = self._keep(np.concatenate(ids) if ids else np.zeros(0, np.int64))
        if not keep.any():
            side = "held-out" if self._split[1] else "training"
            raise UserError(f"{self.dataset.directory}: no {side} documents (holdout_every="
                            f"{self._split[0]}, {len(keep)} documents); use more data or "
                            "change eval.holdout_every")
        self.doc_shard, self.doc_start, self.doc_len = (
            self.doc_shard[keep], self.doc_start[keep], self.doc_len[keep])


def causal_batches(loader: PackedLoader):
    """Next-token batches from the same packed rows: the unmasked tokens are inputs and labels
    (the model shifts), padding ignored, with the rows' `document_ids` (and `position_ids`
    restarting per document when the loader keeps documents apart), so a model with
    `cross_document_attention: false` attends within each document only."""
    for arrays, _ in loader.iter_numpy():
        batch = {"input_ids": torch.from_numpy(arrays["tokens"]),
                 "attention_mask": torch.from_numpy(arrays["attention_mask"]),
                 "document_ids": torch.from_numpy(arrays["document_ids"])}
        if "position_ids" in arrays:
            batch["position_ids"] = torch.from_numpy(arrays["position_ids"])
        batch["labels"] = next_token_labels(batch["input_ids"], batch["attention_mask"],
                                            batch["document_ids"])
        yield batch


def mass_batches(loader: PackedLoader):
    """MASS batches (the loader built with `mass_span`, motian.data.seq2seq_rows): the encoder
    reads the row with its fragment masked, the decoder the fragment shifted right."""
    keys = {"mass_input_ids": "input_ids", "attention_mask": "attention_mask",
            "decoder_input_ids": "decoder_input_ids", "decoder_labels": "decoder_labels"}
    for arrays, _ in loader.iter_numpy():
        batch = {name: torch.from_numpy(np.ascontiguousarray(arrays[key]))
                 for key, name in keys.items()}
        batch["decoder_attention_mask"] = batch["attention_mask"]
        yield batch


def next_token_labels(tokens: torch.Tensor, attention_mask: torch.Tensor,
                      document_ids: torch.Tensor) -> torch.Tensor:
    """Labels (B, L) for a causal LM (which predicts labels[j] at position j - 1): the tokens,
    -100 at padding and at the first token of every document after the first in a row. That
    token would be predicted from the end of an unrelated document ([SEP] of the one before),
    which no context can tell; with document-aware attention it would be predicted from
    nothing at all. Its own document's later tokens still see it (and are predicted)."""
    labels = tokens.masked_fill(attention_mask == 0, -100)
    starts = torch.zeros_like(labels, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return labels.masked_fill(starts, -100)
