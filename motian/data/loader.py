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

**Pair tasks** (``"sop"``, ``"nsp"``, ``"click"``). A pair row is ``[CLS] A [SEP] B [SEP]`` with
segment ids 0/1, a label and a loss weight (see `motian.data.pairs`); MLM masking applies to
pair rows too, so both losses train in the same step. ``pair_fraction`` is the share of each
batch's rows that are pair rows: 1 (the default) makes every row a pair (BERT's NSP, ALBERT's
SOP); below 1 a batch is ``round(batch_size * pair_fraction)`` pair rows (at least one) after
packed corpus rows, the Motian recipe's MLM on the corpus plus the click task in every step.
Corpus rows carry ``pair_labels = -100`` (no pair loss) and ``pair_weights = 0``. The two
streams keep their own epochs and positions: the corpus stream defines the epoch; the pair
stream starts its next epoch (a new order, drawn from (seed, pair epoch)) whenever it runs out.

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

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from motian.data.masking import NONE, MaskedBatch, Masker, MaskingConfig
from motian.data.pairs import (
    ClickSettings,
    PairPlan,
    click_source,
    nsp_plan,
    sentence_index,
    sop_plan,
)
from motian.data.rare_words import RareWords, rare_occurrences
from motian.data.seq2seq_rows import mass_rows, unilm_rows
from motian.data.shards import ENTITY_START, IN_ENTITY, WORD_START, EncodedDataset, Shard
from motian.data.spans import span_boundaries
from motian.data.tokenizer import load_tokenizer, special_token_ids, vocab_tokens
from motian.errors import UserError

PairTask = Literal["none", "sop", "nsp", "click"]
IGNORE = -100  # pair_labels of a corpus row: no pair loss


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
    pair_fraction: float = 1.0  # share of each batch's rows that are pair rows (see above)
    sop_swap_prob: float = 0.5  # SOP: probability that a pair is swapped (label 0)
    nsp_random_prob: float = 0.5  # NSP: probability that B comes from another document
    click_files: tuple[str, ...] = ()  # pair_task="click": click logs, or pd98 / pd98:heldout
    click: ClickSettings = field(default_factory=ClickSettings)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # SpanBERT's SBO: each batch also carries sbo_left / sbo_right / sbo_offset (N,) for its
    # masked tokens (motian.data.spans).
    span_boundaries: bool = False
    # Taking Notes on the Fly: the rare words whose occurrences each batch lists as
    # note_first / note_length / note_id / note_input (M,) (motian.data.rare_words).
    rare_words: RareWords | None = None
    # UNILM: each row's attention mode drawn with these shares (motian.model.masks.MODES
    # order) -> unilm_mode / source_length (B,), token types; MASS: the masked fragment's
    # share of a row -> mass_input_ids / decoder_input_ids / decoder_labels (seq2seq_rows).
    unilm_modes: tuple[float, ...] | None = None
    mass_span: float = 0.0

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise UserError(f"seq_len must be at least 8, got {self.seq_len}")
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UserError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                            f"{self.batch_size}, rank={self.rank}, world_size={self.world_size}")
        if self.pair_task == "click" and not self.click_files:
            raise UserError("pair_task='click' needs click_files (query<TAB>title<TAB>label "
                            "files, or pd98 for the bundled People's Daily stand-in)")
        if not 0.0 < self.pair_fraction <= 1.0:
            raise UserError(f"pair_fraction must be in (0, 1], got {self.pair_fraction}")

    @property
    def pair_rows(self) -> int:
        """Pair rows per process per batch: 0 without a pair task, all rows at fraction 1,
        else round(batch_size * fraction), at least 1 and leaving at least one corpus row."""
        if self.pair_task == "none":
            return 0
        if self.pair_fraction >= 1.0:
            return self.batch_size
        if self.batch_size < 2:
            raise UserError(f"pair_fraction {self.pair_fraction} needs batches of at least 2 "
                            "rows (one corpus row and one pair row) per process")
        return min(max(round(self.batch_size * self.pair_fraction), 1), self.batch_size - 1)

    @property
    def mixed(self) -> bool:
        """Corpus rows and pair rows in every batch."""
        return self.pair_task != "none" and self.pair_fraction < 1.0


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
        check_entities(self.dataset, config.masking)
        random_ids = [i for i, t in enumerate(self.vocab) if not re.fullmatch(r"\[.*\]", t)]
        self.masker = Masker(config.masking, self.special["mask"], np.asarray(random_ids),
                             self.dataset.synonyms())
        self.shards: list[Shard] = [self.dataset.shard(i) for i in range(len(self.dataset))]
        self._index_documents()
        self._sentences = None
        if config.pair_task in ("sop", "nsp"):
            self._sentences = sentence_index(self.shards)
        elif config.pair_task == "click":
            # Tokenizing and segmenting the click texts takes seconds (jieba); a run starts a
            # loader per stage (and one for evaluation), so the result is kept per process.
            key = (tuple(config.click_files), actual, config.click)
            if key not in _CLICK_CACHE:
                while len(_CLICK_CACHE) >= 4:  # training and evaluation logs, bounded
                    _CLICK_CACHE.pop(next(iter(_CLICK_CACHE)))
                _CLICK_CACHE[key] = click_source(list(config.click_files), tok,
                                                 self.dataset.synonyms(), config.click)
            shard, click = _CLICK_CACHE[key]
            self._click = dataclasses.replace(click)
            self.shards.append(shard)
            self._click.shard = np.full_like(self._click.shard, len(self.shards) - 1)
        self.epoch, self.cursor = 0, 0
        self.pair_epoch, self.pair_cursor = 0, 0  # the pair stream, when mixed
        self._plan_cache: tuple[int, _Plan] | None = None
        self._pairs_cache: tuple[int, _Plan] | None = None
        self._check_sizes(data)

    def _check_sizes(self, data) -> None:
        c = self.config
        if self.steps_per_epoch == 0:
            raise UserError(f"{data}: one epoch has {self._plan(self.epoch).row_order.size} "
                            f"rows of {c.seq_len} tokens, fewer than one global batch "
                            f"({self._global_primary // c.world_size} x {c.world_size} "
                            "processes); use more data or a smaller batch")
        if c.mixed and len(self._pairs(0).row_order) < c.pair_rows * c.world_size:
            raise UserError(f"{data}: {len(self._pairs(0).row_order)} {c.pair_task} pairs, "
                            f"fewer than the {c.pair_rows * c.world_size} pair rows of one "
                            "global batch; give more pairs or a smaller pair_fraction")

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
        if cfg.pair_task == "none" or cfg.mixed:
            if len(self.doc_len) == 0:
                raise UserError(f"{self.dataset.directory}: no corpus documents to mix with "
                                "the pair rows")
            doc_order = rng.permutation(len(self.doc_len))
            stream_end = np.cumsum(self.doc_len[doc_order] + 1)
            n_rows = -(-int(stream_end[-1]) // (cfg.seq_len - 1))
            plan = _Plan(rng.permutation(n_rows), doc_order, stream_end)
        else:
            plan = self._pair_plan(rng)
        self._plan_cache = (epoch, plan)
        return plan

    def _pairs(self, epoch: int) -> _Plan:
        """The pair stream's plan of pair epoch `epoch` (mixed batches only)."""
        if self._pairs_cache is None or self._pairs_cache[0] != epoch:
            rng = np.random.default_rng([self.config.seed, PAIR_STREAM, epoch])
            self._pairs_cache = (epoch, self._pair_plan(rng))
        return self._pairs_cache[1]

    def _pair_plan(self, rng: np.random.Generator) -> _Plan:
        cfg = self.config
        cap = cfg.seq_len - 3
        if cfg.pair_task == "sop":
            pairs = sop_plan(self._sentences, cap, rng, cfg.sop_swap_prob)
        elif cfg.pair_task == "nsp":
            try:
                pairs = nsp_plan(self._sentences, cap, rng, cfg.nsp_random_prob)
            except ValueError as e:
                raise UserError(f"{self.dataset.directory}: {e}") from None
        else:
            pairs = self._click.truncated(cap)
        return _Plan(rng.permutation(len(pairs.label)), pairs=pairs)

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plan(self.epoch).row_order) // self._global_primary

    @property
    def _global_batch(self) -> int:
        return self.config.batch_size * self.config.world_size

    @property
    def _primary_rows(self) -> int:
        """Rows per process per batch from the stream that defines the epoch."""
        c = self.config
        return c.batch_size - c.pair_rows if c.mixed else c.batch_size

    @property
    def _global_primary(self) -> int:
        return self._primary_rows * self.config.world_size

    def state_dict(self) -> dict:
        """Where the loader stands: the next batch `__iter__` yields is the one after the last
        batch already yielded."""
        c = self.config
        return {"epoch": self.epoch, "rows_consumed": self.cursor, "seed": c.seed,
                "seq_len": c.seq_len, "global_batch": self._global_batch,
                "pair_task": c.pair_task, "masking": asdict(c.masking),
                "n_tokens": self.dataset.n_tokens, "n_docs": self.dataset.n_docs,
                "pair_rows": c.pair_rows * c.world_size, "pair_epoch": self.pair_epoch,
                "pair_rows_consumed": self.pair_cursor}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken, without reading the earlier data."""
        mine = self.state_dict()
        old = {"pair_rows": self._global_batch if self.config.pair_task != "none" else 0}
        for key in ("seed", "seq_len", "global_batch", "pair_task", "n_tokens", "n_docs",
                    "pair_rows"):
            if state.get(key, old.get(key)) != mine[key]:
                raise UserError(f"the saved loader position was taken with {key}="
                                f"{state.get(key)!r} but this loader has {mine[key]!r}; it "
                                "would not continue the same data. Resume with the same data "
                                "and settings (rank count may change if the global batch stays)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["rows_consumed"])
        self.pair_epoch = int(state.get("pair_epoch", 0))
        self.pair_cursor = int(state.get("pair_rows_consumed", 0))
        if self.cursor % self._global_primary:
            raise UserError(f"saved position {self.cursor} is not a whole number of global "
                            f"batches of {self._global_primary} rows")

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for arrays, masked in self.iter_numpy():
            yield to_torch(arrays, masked)

    def iter_numpy(self) -> Iterator[tuple[dict[str, np.ndarray], MaskedBatch]]:
        """Like `__iter__` but yields the numpy arrays and the full `MaskedBatch` (with the
        action taken on every token), for inspection and benchmarks."""
        c = self.config
        g, b = self._global_primary, self._primary_rows
        while True:
            plan = self._plan(self.epoch)
            end = len(plan.row_order) // g * g
            while self.cursor + g <= end:
                first = self.cursor + c.rank * b
                rows = plan.row_order[first: first + b]
                epoch = self.epoch
                self.cursor += g  # before yielding: state says "next"
                extra = self._next_pairs() if c.mixed else None
                yield self.make_batch(plan, rows, np.random.default_rng([c.seed, epoch, first]),
                                      extra)
            self.epoch, self.cursor = self.epoch + 1, 0

    def _next_pairs(self) -> tuple[_Plan, np.ndarray]:
        """This process's pair rows of the next step from the pair stream (mixed batches)."""
        c = self.config
        g = c.pair_rows * c.world_size
        plan = self._pairs(self.pair_epoch)
        if self.pair_cursor + g > len(plan.row_order):
            self.pair_epoch, self.pair_cursor = self.pair_epoch + 1, 0
            plan = self._pairs(self.pair_epoch)
        first = self.pair_cursor + c.rank * c.pair_rows
        self.pair_cursor += g
        return plan, plan.row_order[first: first + c.pair_rows]

    def make_batch(self, plan: _Plan, rows: np.ndarray, rng: np.random.Generator,
                   extra: tuple[_Plan, np.ndarray] | None = None
                   ) -> tuple[dict[str, np.ndarray], MaskedBatch]:
        """The batch of `rows` of `plan`, followed by the pair rows `extra` (mixed batches)."""
        if plan.pairs is None:
            arrays = self._packed_rows(plan, rows)
            if self.config.pair_task != "none":
                n = len(rows)
                arrays["pair_labels"] = np.full(n, IGNORE, np.int64)
                arrays["pair_weights"] = np.zeros(n, np.float32)
        else:
            arrays = self._pair_rows(plan.pairs, rows)
        if extra is not None:
            pairs = self._pair_rows(extra[0].pairs, extra[1])
            arrays = {k: np.concatenate([v, pairs[k]]) for k, v in arrays.items()}
        flags, content = arrays.pop("flags"), arrays.pop("content")
        word_start = flags & WORD_START > 0
        entities = {"entity_start": flags & ENTITY_START > 0, "in_entity": flags & IN_ENTITY > 0} \
            if self.config.masking.entity_prob > 0 else {}
        masked = self.masker(arrays["tokens"], word_start, content, arrays.pop("synonyms"), rng,
                             **entities)
        c = self.config
        if c.span_boundaries:
            arrays.update(span_boundaries(masked.mlm_positions, c.seq_len))
        if c.rare_words is not None:
            text = content | (arrays["tokens"] == self.special["unk"])
            arrays.update(rare_occurrences(arrays["tokens"], word_start, text,
                                           masked.actions != NONE, c.rare_words))
        if c.unilm_modes is not None:  # drawn after the masks: the masker's stream is as before
            arrays.update(unilm_rows(arrays["attention_mask"], c.unilm_modes, rng))
        if c.mass_span:
            arrays.update(mass_rows(arrays["tokens"], arrays["attention_mask"], c.mass_span,
                                    self.special["mask"], rng))
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
        shard = np.where(in_a, pairs.shard[rows][:, None], pairs.shard_of_b()[rows][:, None])
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
            "pair_weights": pairs.weights()[rows],
        }
        if not self.config.cross_document_attention:
            out["position_ids"] = np.broadcast_to(j, (len(rows), L)).copy()
        return out


_CLICK_CACHE: dict[tuple, tuple[Shard, PairPlan]] = {}
PAIR_STREAM = 7919  # tags the pair stream's random orders apart from the corpus stream's


def check_entities(dataset: EncodedDataset, masking: MaskingConfig) -> None:
    """Entity masking needs shards that mark entities: UserError for shards encoded without
    --entities (or by a motian from before entities, whose flags have no entity bits)."""
    if masking.entity_prob > 0 and "entities" not in dataset.manifest.get("settings", {}):
        raise UserError(f"{dataset.directory / 'manifest.json'}: these shards carry no entity "
                        f"spans (encoded without --entities, or by an older motian), but the "
                        f"masking asks for entity units (entity_prob {masking.entity_prob:g}); "
                        f"encode them again with `motian encode ... --entities tags` (pd98 or "
                        "word/TAG tagger output) or `--entities LIST.txt` (one entity per line), "
                        "or set entity_prob to 0")


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
