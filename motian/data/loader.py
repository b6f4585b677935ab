"""The pretraining loader: encoded shards -> packed, masked batches of torch tensors.

Owns `LoaderConfig` and `PackedLoader`. What a batch holds is the contract with the model
(issue 4): ``input_ids``, ``attention_mask``, ``token_type_ids``, ``document_ids`` (B, L),
``position_ids`` (B, L) when documents may not see each other, ``mlm_positions`` /
``mlm_labels`` (N,) and, with a pair task, ``pair_labels`` (B,).

**Packing** (``pair_task="none"``). Each epoch the documents are put in a new order drawn from
(seed, epoch) and laid end to end, each followed by [SEP]; the stream is cut into rows of L-1
tokens and each row gets a leading [CLS] (RoBERTa's FULL-SENTENCES packing: no padding except
in the very last row, and a long document simply continues in the next row). Rows are then
visited in a second random order. Because the cut depends only on L, the same shards serve
L=128 and L=512. A row holds several documents: ``document_ids`` numbers them 0, 1, 2 ... (the
[CLS] belongs to the first), and when ``cross_document_attention`` is off the loader also
supplies ``position_ids`` restarting at 0 for every document, and the model builds the
block-diagonal attention mask from ``document_ids``.

**Pair tasks** (``"sop"``, ``"click"``). Each row is ``[CLS] A [SEP] B [SEP]`` with segment ids
0/1 and a label per row (see `motian.data.pairs`); MLM masking applies to the same rows, so
both losses train together (ALBERT's recipe for SOP).

**Position and ranks.** The position is (epoch, rows consumed in the epoch); every order is a
pure function of (seed, epoch), so `load_state_dict` restores it exactly by recomputing the
epoch's permutations (O(documents), no data read) and jumping to the cursor. A global step
takes the next ``batch_size * world_size`` rows of the epoch order and rank r takes its own
contiguous slice of them: ranks are disjoint by construction, all ranks get the same number of
steps (the epoch's remainder rows are dropped; they differ every epoch), and the data of a
step does not depend on how the global batch is split, so a run can resume on another number
of processes with the same global batch. Masking draws from a generator seeded by (seed,
epoch, first row of the batch): the same rows always get the same masks.

**Why a plain iterator and not a torch DataLoader with workers.** Assembling and masking a
batch is a few vectorised numpy operations (see ``benchmarks/masking.py``: well under a
millisecond per 32x128 batch), far below a model step, so worker processes would add start-up
time, memory and a second place where the position lives, and gain nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from motian.data.masking import MaskedBatch, Masker, MaskingConfig
from motian.data.pairs import PairPlan, click_source, sentence_index, sop_plan
from motian.data.shards import WORD_START, EncodedDataset, Shard
from motian.data.tokenizer import load_tokenizer, special_token_ids, vocab_tokens
from motian.errors import UserError

PairTask = Literal["none", "sop", "click"]


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are cut from the shards. Everything here changes *what* is trained, except
    rank and world_size, which only split each global batch between processes."""

    seq_len: int = 128
    batch_size: int = 32  # rows per process per step
    seed: int = 0
    cross_document_attention: bool = True  # False: the model masks attention per document
    rank: int = 0
    world_size: int = 1
    pair_task: PairTask = "none"
    sop_swap_prob: float = 0.5  # SOP: probability that a pair is swapped (label 0)
    click_files: tuple[str, ...] = ()  # pair_task="click": query<TAB>title<TAB>label files
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise UserError(f"seq_len must be at least 8, got {self.seq_len}")
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UserError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                            f"{self.batch_size}, rank={self.rank}, world_size={self.world_size}")
        if self.pair_task == "click" and not self.click_files:
            raise UserError("pair_task='click' needs click_files (query<TAB>title<TAB>label)")


@dataclass
class _Plan:
    """One epoch's orders."""

    row_order: np.ndarray  # int64 (n_rows,): row ids in visiting order
    doc_order: np.ndarray | None = None  # packing: document ids in stream order
    stream_end: np.ndarray | None = None  # packing: int64, end of each document + its [SEP]
    pairs: PairPlan | None = None  # pair tasks: the epoch's examples


class PackedLoader:
    """Yields batches (dicts of torch tensors, see the module docstring) forever, epoch after
    epoch; `steps_per_epoch` says how many make an epoch, `state_dict` where it stands."""

    def __init__(self, data: str | Path, tokenizer: str | Path | None = None,
                 config: LoaderConfig | None = None):
        """`data`: a directory written by `motian encode`; `tokenizer`: the tokenizer it was
        encoded with (default: the vocab.txt that `encode` copies into `data`)."""
        self.config = config = config or LoaderConfig()
        tokenizer = Path(tokenizer) if tokenizer is not None else Path(data) / "vocab.txt"
        tok = load_tokenizer(tokenizer)
        self.special = special_token_ids(tok)
        self.vocab = vocab_tokens(tok)
        self.dataset = EncodedDataset(data)
        # Refuse shards encoded with another vocabulary (ids would mean other tokens); the hash
        # is the one `vocab_hash` computes from a vocab.txt, here from the loaded tokenizer.
        actual = hashlib.sha256("\n".join(self.vocab).encode("utf-8")).hexdigest()
        if self.dataset.manifest.get("vocab_hash") not in (None, actual):
            raise UserError(f"{data}: these shards were encoded with another vocabulary than "
                            f"{tokenizer}; token ids would mean different tokens. Use the "
                            "tokenizer they were encoded with (the default, data/vocab.txt), "
                            "or run `motian encode` again")
        random_ids = [i for i, t in enumerate(self.vocab) if not re.fullmatch(r"\[.*\]", t)]
        self.masker = Masker(config.masking, self.special["mask"], np.asarray(random_ids),
                             self.dataset.synonyms())
        self.shards: list[Shard] = [self.dataset.shard(i) for i in range(len(self.dataset))]
        self._index_documents()
        self._sentences = None
        if config.pair_task == "sop":
            self._sentences = sentence_index(self.shards)
        elif config.pair_task == "click":
            shard, self._click = click_source([Path(f) for f in config.click_files], tok,
                                              self.dataset.synonyms())
            self.shards.append(shard)
            self._click.shard = np.full_like(self._click.shard, len(self.shards) - 1)
        self.epoch, self.cursor = 0, 0
        self._plan_cache: tuple[int, _Plan] | None = None
        if self.steps_per_epoch == 0:
            raise UserError(f"{data}: one epoch has {self._plan(0).row_order.size} rows of "
                            f"{config.seq_len} tokens, fewer than one global batch "
                            f"({config.batch_size} x {config.world_size} processes); use more "
                            "data or a smaller batch")

    def _index_documents(self) -> None:
        shard_ids, starts, lens = [], [], []
        for s, shard in enumerate(self.shards):
            docs = np.asarray(shard.docs, dtype=np.int64)
            keep = np.diff(docs) > 0  # empty documents would leave a lone [SEP]
            starts.append(docs[:-1][keep])
            lens.append(np.diff(docs)[keep])
            shard_ids.append(np.full(int(keep.sum()), s, dtype=np.int64))
        self.doc_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
        self.doc_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.doc_len = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        if len(self.doc_len) == 0 and self.config.pair_task != "click":
            raise UserError(f"{self.dataset.directory}: the encoded dataset has no tokens")

    # ------------------------------------------------------------------ epochs and position

    def _plan(self, epoch: int) -> _Plan:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.config.seed, epoch])
        cfg = self.config
        if cfg.pair_task == "none":
            doc_order = rng.permutation(len(self.doc_len))
            stream_end = np.cumsum(self.doc_len[doc_order] + 1)
            n_rows = -(-int(stream_end[-1]) // (cfg.seq_len - 1))
            plan = _Plan(rng.permutation(n_rows), doc_order, stream_end)
        else:
            pairs = (sop_plan(self._sentences, cfg.seq_len - 3, rng, cfg.sop_swap_prob)
                     if cfg.pair_task == "sop" else self._click.truncated(cfg.seq_len - 3))
            plan = _Plan(rng.permutation(len(pairs.label)), pairs=pairs)
        self._plan_cache = (epoch, plan)
        return plan

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plan(self.epoch).row_order) // self._global_batch

    @property
    def _global_batch(self) -> int:
        return self.config.batch_size * self.config.world_size

    def state_dict(self) -> dict:
        """Where the loader stands: the next batch `__iter__` yields is the one after the last
        batch already yielded."""
        c = self.config
        return {"epoch": self.epoch, "rows_consumed": self.cursor, "seed": c.seed,
                "seq_len": c.seq_len, "global_batch": self._global_batch,
                "pair_task": c.pair_task, "masking": asdict(c.masking),
                "n_tokens": self.dataset.n_tokens, "n_docs": self.dataset.n_docs}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken, without reading the earlier data."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "pair_task", "n_tokens", "n_docs"):
            if state.get(key) != mine[key]:
                raise UserError(f"the saved loader position was taken with {key}="
                                f"{state.get(key)!r} but this loader has {mine[key]!r}; it "
                                "would not continue the same data. Resume with the same data "
                                "and settings (rank count may change if the global batch stays)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["rows_consumed"])
        if self.cursor % self._global_batch:
            raise UserError(f"saved position {self.cursor} is not a whole number of global "
                            f"batches of {self._global_batch} rows")

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for arrays, masked in self.iter_numpy():
            yield to_torch(arrays, masked)

    def iter_numpy(self) -> Iterator[tuple[dict[str, np.ndarray], MaskedBatch]]:
        """Like `__iter__` but yields the numpy arrays and the full `MaskedBatch` (with the
        action taken on every token), for inspection and benchmarks."""
        c = self.config
        while True:
            plan = self._plan(self.epoch)
            end = len(plan.row_order) // self._global_batch * self._global_batch
            while self.cursor + self._global_batch <= end:
                first = self.cursor + c.rank * c.batch_size
                rows = plan.row_order[first: first + c.batch_size]
                epoch = self.epoch
                self.cursor += self._global_batch  # before yielding: state says "next"
                yield self.make_batch(plan, rows, np.random.default_rng([c.seed, epoch, first]))
            self.epoch, self.cursor = self.epoch + 1, 0

    def make_batch(self, plan: _Plan, rows: np.ndarray,
                   rng: np.random.Generator) -> tuple[dict[str, np.ndarray], MaskedBatch]:
        if plan.pairs is None:
            arrays = self._packed_rows(plan, rows)
        else:
            arrays = self._pair_rows(plan.pairs, rows)
        masked = self.masker(arrays["tokens"], arrays.pop("flags") & WORD_START > 0,
                             arrays.pop("content"), arrays.pop("synonyms"), rng)
        return arrays, masked

    # ------------------------------------------------------------------ assembling rows

    def _gather(self, shard: np.ndarray, index: np.ndarray, valid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens, flags, synonym rows at (shard, index) where `valid`; zeros elsewhere. Loops
        over the shards present in the batch only (usually one or two)."""
        tokens = np.zeros(index.shape, np.int64)
        flags = np.zeros(index.shape, np.uint8)
        syn = np.full(index.shape, -1, np.int64)
        for s in np.unique(shard[valid]):
            m = valid & (shard == s)
            idx = index[m]
            src = self.shards[s]
            tokens[m] = src.tokens[idx]
            flags[m] = src.flags[idx]
            syn[m] = src.synonyms[idx]
        return tokens, flags, syn

    def _packed_rows(self, plan: _Plan, rows: np.ndarray) -> dict[str, np.ndarray]:
        C = self.config.seq_len - 1  # content slots after [CLS]
        stream = rows[:, None] * C + np.arange(C)  # (B, C) positions in the epoch's stream
        valid = stream < plan.stream_end[-1]
        k = np.minimum(np.searchsorted(plan.stream_end, stream, side="right"),
                       len(plan.stream_end) - 1)  # (B, C) document slot in the stream
        doc = plan.doc_order[k]
        offset = stream - (plan.stream_end[k] - self.doc_len[doc] - 1)
        is_sep = valid & (offset == self.doc_len[doc])
        text = valid & ~is_sep
        tokens, flags, syn = self._gather(self.doc_shard[doc], self.doc_start[doc] + offset, text)
        tokens[is_sep] = self.special["sep"]
        tokens[~valid] = self.special["pad"]
        B = len(rows)
        col = np.zeros((B, 1), np.int64)
        document_ids = np.concatenate([col, k - k[:, :1]], axis=1)
        out = {
            "tokens": np.concatenate([col + self.special["cls"], tokens], axis=1),
            "flags": np.concatenate([col.astype(np.uint8), flags], axis=1),
            "synonyms": np.concatenate([col - 1, syn], axis=1),
            "content": np.concatenate([col.astype(bool), text], axis=1),
            "attention_mask": np.concatenate([col + 1, valid], axis=1).astype(np.int64),
            "token_type_ids": np.zeros((B, C + 1), np.int64),
            "document_ids": document_ids,
        }
        out["content"] &= out["tokens"] != self.special["unk"]
        if not self.config.cross_document_attention:
            out["position_ids"] = _restarting_positions(document_ids)
        return out

    def _pair_rows(self, pairs: PairPlan, rows: np.ndarray) -> dict[str, np.ndarray]:
        L = self.config.seq_len
        la, lb = pairs.a_len[rows][:, None], pairs.b_len[rows][:, None]  # (B, 1)
        j = np.arange(L)[None, :]
        in_a = (j >= 1) & (j <= la)
        in_b = (j >= la + 2) & (j <= la + lb + 1)
        index = np.where(in_a, pairs.a_start[rows][:, None] + j - 1,
                         pairs.b_start[rows][:, None] + j - la - 2)
        shard = np.broadcast_to(pairs.shard[rows][:, None], index.shape)
        text = in_a | in_b
        tokens, flags, syn = self._gather(shard, index, text)
        sep = (j == la + 1) | (j == la + lb + 2)
        real = j <= la + lb + 2
        tokens[sep] = self.special["sep"]
        tokens[:, 0] = self.special["cls"]
        tokens[~real] = self.special["pad"]
        out = {
            "tokens": tokens, "flags": flags, "synonyms": syn,
            "content": text & (tokens != self.special["unk"]),
            "attention_mask": real.astype(np.int64),
            "token_type_ids": (in_b | (j == la + lb + 2)).astype(np.int64),
            "document_ids": np.zeros((len(rows), L), np.int64),
            "pair_labels": pairs.label[rows].astype(np.int64),
        }
        if not self.config.cross_document_attention:
            out["position_ids"] = np.broadcast_to(j, (len(rows), L)).copy()
        return out


def _restarting_positions(document_ids: np.ndarray) -> np.ndarray:
    """(B, L) positions that restart at 0 where `document_ids` changes along a row."""
    B, L = document_ids.shape
    j = np.broadcast_to(np.arange(L), (B, L))
    new = np.ones((B, L), dtype=bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return j - np.maximum.accumulate(np.where(new, j, 0), axis=1)


def to_torch(arrays: dict[str, np.ndarray], masked: MaskedBatch) -> dict[str, torch.Tensor]:
    """The model's batch (the issue-3/issue-4 contract) from the numpy arrays."""
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()
             if k != "tokens"}
    batch["input_ids"] = torch.from_numpy(masked.input_ids)
    batch["mlm_positions"] = torch.from_numpy(masked.mlm_positions)
    batch["mlm_labels"] = torch.from_numpy(masked.mlm_labels)
    return batch
