"""Stream batching for segment recurrence (Transformer-XL, `motian.train.xl`).

The training (or held-out) documents are laid end to end in dataset order, each followed by
[SEP] (the paper's <eos>), into one token stream, which is cut into P contiguous *parts* of
n = len // P tokens. Row p of step t is the t-th segment of part p: tokens
[p*n + t*L, p*n + t*L + L) as input and the same shifted by one as targets, so every token of a
part is predicted exactly once per epoch and row p of step t + 1 continues where row p of step
t stopped. This is the language-modelling setup of Transformer-XL (Dai et al. 2019, section 4;
the reference code's `LMOrderedIterator`): the memory a row carries is the real preceding text.

Nothing is shuffled: the order *is* the data. After the last whole segment of a part the
stream starts its next epoch from the parts' beginnings (the memory is carried across that
seam, as across document boundaries: the paper carries it over the concatenated corpus).

A step's P rows are split into micro-batches of consecutive parts; each row says which part
it is (`stream_part`), so the objective keeps one memory per part whatever the micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from motian.data.loader import LoaderConfig
from motian.data.masking import MaskingConfig
from motian.data.splits import SplitLoader
from motian.errors import UserError


def split_documents(data: Path, holdout_every: int, held_out: bool
                    ) -> tuple[list[np.ndarray], list[str]]:
    """The token ids of the training (or held-out) documents of `data`, in dataset order, and
    the vocabulary of the data."""
    split = SplitLoader(Path(data), LoaderConfig(seq_len=8, batch_size=1,
                                                 masking=MaskingConfig(strategy="token")),
                        holdout_every, held_out)
    docs = [np.asarray(split.shards[shard].tokens[start:start + length])
            for shard, start, length in zip(split.doc_shard, split.doc_start, split.doc_len)]
    return docs, split.vocab


def document_stream(data: Path, holdout_every: int, held_out: bool) -> tuple[np.ndarray, int]:
    """The training (or held-out) documents of `data` end to end, each followed by [SEP], and
    the vocabulary size of the data."""
    docs, vocab = split_documents(data, holdout_every, held_out)
    sep = np.array([vocab.index("[SEP]")], dtype=docs[0].dtype)
    pieces = [piece for doc in docs for piece in (doc, sep)]
    return np.concatenate(pieces).astype(np.int64), len(vocab)


class StreamLoader:
    """Consecutive segments of `parts` contiguous parts of `tokens` (see the module docstring).
    Yields micro-batches of `micro` rows: input_ids, targets (B, L), attention_mask (all ones)
    and stream_part (B,). `state_dict` is the number of steps read."""

    def __init__(self, tokens: np.ndarray, seq_len: int, parts: int, micro: int | None = None):
        micro = parts if micro is None else micro
        if seq_len < 1 or parts < 1 or micro < 1 or parts % micro:
            raise UserError(f"stream batching needs seq_len >= 1 and a micro-batch that "
                            f"divides the {parts} parts, got seq_len={seq_len}, "
                            f"micro-batch={micro}")
        self.tokens, self.seq_len, self.parts, self.micro = tokens, seq_len, parts, micro
        self.part_length = len(tokens) // parts
        # Each segment needs one token past its end (the last target).
        self.segments = (self.part_length - 1) // seq_len
        if self.segments < 1:
            raise UserError(f"the token stream ({len(tokens):,} tokens) is too short for "
                            f"{parts} parts of at least {seq_len + 1} tokens; use fewer rows "
                            "(global_batch), a shorter segment, or more data")
        self.position = 0  # micro-batches yielded

    def segment(self, t: int) -> dict[str, torch.Tensor]:
        """All P rows of step t (segment t mod segments of every part)."""
        L = self.seq_len
        starts = np.arange(self.parts) * self.part_length + (t % self.segments) * L
        window = self.tokens[starts[:, None] + np.arange(L + 1)]  # (P, L + 1)
        ids = torch.from_numpy(window)
        return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous(),
                "attention_mask": torch.ones(self.parts, L, dtype=torch.long),
                "stream_part": torch.arange(self.parts)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        per_step = self.parts // self.micro
        while True:
            t, k = divmod(self.position, per_step)
            rows = slice(k * self.micro, (k + 1) * self.micro)
            self.position += 1
            yield {name: value[rows] for name, value in self.segment(t).items()}

    def state_dict(self) -> dict:
        # Taken at a step boundary (the loop saves between steps): in steps, so a resume may
        # use another micro-batch (a run setting).
        return {"steps": self.position // (self.parts // self.micro), "parts": self.parts,
                "seq_len": self.seq_len, "n_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the micro-batch `state` was taken at; refuse another stream."""
        for key in ("parts", "seq_len", "n_tokens"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(f"the saved stream position was taken with {key}="
                                f"{state.get(key)}, this run has {self.state_dict()[key]}; "
                                "resume with the same data and recipe")
        self.position = int(state["steps"]) * (self.parts // self.micro)
