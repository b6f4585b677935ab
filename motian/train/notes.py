"""Taking Notes on the Fly (TNF; Wu et al. 2021, "Taking Notes on the Fly Helps Language
Pre-Training", ICLR 2021, arXiv:2008.01466): a note dictionary for rare words, beside MLM.

Recipe: ``objective: {kind: mlm, notes: true}`` (`motian/configs/notes-demo.yaml`).

**The dictionary.** One row per rare word of the training documents (`motian.data.rare_words`:
a jieba word, as its token span, occurring at least `notes_min_count` and fewer than
`notes_threshold` times). A row holds the word's note (hidden,) and how many occurrences have
been noted into it.

**Taking a note.** For an occurrence of rare word w at tokens s..t of a row, TNF's note is the
mean of the last layer's outputs c_j over the word and k = `notes_window` tokens each side:

    Note(w, x) = mean_{j = s-k .. t+k} c_j     (detached: no gradient through the notes)

with the window clipped to the word's document within the row (and to real tokens). (The paper
writes the divisor as 2k + t - s; here it is the number of tokens actually averaged.) The
dictionary is updated with TNF's moving average, gamma = `notes_gamma` (0.1 by default):

    NoteDict(w) = (1 - gamma) * NoteDict(w) + gamma * Note(w, x)

Two choices, so that the result does not depend on how a step is split into micro-batches or
processes: the notes of a step are taken from its forward passes and applied once, after its
last backward (every micro-batch of a step reads the notes as they were at the step's start),
and several occurrences of w in one step enter as one update with their mean. A word's first
note is stored as it is (a discounted all-zero note would only shrink its embedding).

**Using a note.** At an occurrence of w whose note exists and none of whose tokens is chosen
for prediction (the note names the word: on a masked word it would give the answer away), its
tokens' input embeddings become (1 - lambda) * embedding + lambda * NoteDict(w), lambda =
`notes_lambda` (0.5 in TNF; `motian.model.notes`).

**State.** The dictionary (``notes`` (R, hidden) float32, ``notes_taken`` (R,) occurrences
noted per word) is saved with every checkpoint (objective.safetensors) and restored on resume; the
rare-word list itself is recomputed from the same data (the resume checks refuse other data).
The notes are dropped from the trained model: final/ is a plain MaskedLM, and the held-out
evaluation runs without notes, as a fine-tuned model will. Logged: notes_used (occurrences
whose input got a note, per logging window), notes_used_per_row, rare_per_row, notes_taken
(words with a note so far) and notes_words (the dictionary's size).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.data.loader import LoaderConfig
from motian.data.rare_words import RareWords, find_rare_words
from motian.data.splits import SplitLoader
from motian.errors import UserError
from motian.model.notes import notes_in_input
from motian.train.mlm_rows import encode_rows, mlm_pair_terms
from motian.train.objectives import Pretrainer, TaskWeighting
from motian.train.recipe import ObjectiveSpec, Recipe

BATCH_KEYS = ("note_first", "note_length", "note_id", "note_input")


class NotesPretrainer(Pretrainer):
    """`Pretrainer` (MLM, optional pair task, task weighting, held-out evaluation) with a note
    dictionary of `rare` words in the input (see the module docstring)."""

    def __init__(self, model, weighting: TaskWeighting, evalset=None, pair_evalset=None,
                 rare: RareWords | None = None, spec: ObjectiveSpec = ObjectiveSpec()):
        super().__init__(model, weighting, evalset, pair_evalset)
        n = len(rare) if rare is not None else 0
        # Frozen parameters rather than buffers: never optimised, but DDP leaves them alone
        # (it would broadcast rank 0's buffers before every forward; every rank applies the
        # same all-reduced update instead), and `extra_state` saves them with checkpoints.
        self.notes = nn.Parameter(torch.zeros(n, model.config.hidden), requires_grad=False)
        self.notes_taken = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.window, self.gamma, self.weight = spec.notes_window, spec.notes_gamma, \
            spec.notes_lambda
        self._pending: list[tuple[Tensor, Tensor]] = []  # this step's (word ids, new notes)

    def extra_state(self) -> dict[str, Tensor]:
        return {**super().extra_state(), "notes": self.notes.detach(),
                "notes_taken": self.notes_taken.detach()}

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise UserError(f"the batch has no {', '.join(missing)}: the note dictionary needs "
                            "a loader built with rare_words (LoaderConfig.rare_words)")
        ids, first, length = batch["note_id"], batch["note_first"], batch["note_length"]
        use = batch["note_input"] & (self.notes_taken[ids] > 0)  # (M,)
        positions, occurrence = token_positions(first[use], length[use])  # (T,) each
        notes = self.notes[ids[use]][occurrence]  # (T, hidden)
        with notes_in_input(self.model.backbone.embeddings.word, positions, notes, self.weight):
            masked, cls, h = encode_rows(self.model, batch, full=True)  # h: (B, L, hidden)
        losses, stats = mlm_pair_terms(self.model, masked, cls, batch, tokens_per_rank,
                                       micro_steps)
        if len(ids):
            self._pending.append((ids, self.take_notes(h.detach(), batch)))
        stats["notes_used"] = use.sum().float()
        stats["rare_words"] = ids.new_tensor(len(ids), dtype=torch.float32)
        stats["rows"] = ids.new_tensor(len(h), dtype=torch.float32)
        return self.weighting(losses, 1.0 / micro_steps), stats

    def take_notes(self, h: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """(M, hidden) Note(w, x) of every rare-word occurrence of the batch: the mean of `h`
        (B, L, hidden) over the word and `window` tokens each side, inside its document."""
        B, L, _ = h.shape
        first, length = batch["note_first"], batch["note_length"]
        row, start = first // L, first % L
        end = start + length - 1
        doc_first, doc_last = document_edges(batch, B, L, h.device)  # (B, L) each
        lo = torch.maximum(start - self.window, doc_first[row, start])
        hi = torch.minimum(end + self.window, doc_last[row, start])
        sums = F.pad(h.float().cumsum(1), (0, 0, 1, 0))  # (B, L + 1, hidden): sums[:, j] = c_<j
        total = sums[row, hi + 1] - sums[row, lo]  # (M, hidden)
        return total / (hi - lo + 1).unsqueeze(1).float()

    def after_backward(self) -> None:
        """Apply the step's notes (all ranks alike) once the step's forwards are done."""
        super().after_backward()
        pending, self._pending = self._pending, []
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if not pending and not distributed:
            return
        ids = torch.cat([p[0] for p in pending]) if pending else \
            torch.zeros(0, dtype=torch.long, device=self.notes.device)
        new = torch.cat([p[1] for p in pending]) if pending else self.notes.new_zeros(0, 0)
        with torch.no_grad():
            if distributed:  # one dense all-reduce per step (R x hidden floats)
                sums = self.notes.new_zeros(self.notes.shape)
                counts = self.notes_taken.new_zeros(self.notes_taken.shape)
                if len(ids):
                    sums.index_add_(0, ids, new)
                    counts.index_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
                torch.distributed.all_reduce(sums)
                torch.distributed.all_reduce(counts)
                ids = counts.nonzero().squeeze(1)
                sums, counts = sums[ids], counts[ids]
            else:
                ids, inverse = torch.unique(ids, return_inverse=True)
                sums = new.new_zeros(len(ids), new.shape[1]).index_add_(0, inverse, new)
                counts = torch.bincount(inverse, minlength=len(ids)).to(sums.dtype)
            self.update_notes(ids, sums / counts.unsqueeze(1), counts)

    @torch.no_grad()
    def update_notes(self, ids: Tensor, mean: Tensor, counts: Tensor) -> None:
        """NoteDict(w) = (1 - gamma) NoteDict(w) + gamma mean for the words `ids` (a word's first
        note is stored as it is); a non-finite note (a step that went NaN) is dropped."""
        ok = torch.isfinite(mean).all(dim=1)
        ids, mean, counts = ids[ok], mean[ok], counts[ok]
        fresh = (self.notes_taken[ids] == 0).unsqueeze(1)
        old = self.notes[ids]
        self.notes[ids] = torch.where(fresh, mean, (1.0 - self.gamma) * old + self.gamma * mean)
        self.notes_taken[ids] += counts

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        values = super().summarise(sums)
        if sums.get("rows"):
            values["notes_used"] = sums.get("notes_used", 0.0)
            values["notes_used_per_row"] = sums.get("notes_used", 0.0) / sums["rows"]
            values["rare_per_row"] = sums.get("rare_words", 0.0) / sums["rows"]
        return values

    def log_extra(self) -> dict[str, float]:
        return {**super().log_extra(), "notes_taken": float((self.notes_taken > 0).sum()),
                "notes_words": float(len(self.notes_taken))}


def token_positions(first: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """Flat token positions (T,) of words starting at `first` (M,) with `length` tokens, and
    the word index (T,) of each."""
    occurrence = torch.repeat_interleave(torch.arange(len(first), device=first.device), length)
    offset = torch.arange(len(occurrence), device=first.device) - \
        (torch.cumsum(length, 0) - length)[occurrence]
    return first[occurrence] + offset, occurrence


def document_edges(batch: dict[str, Tensor], B: int, L: int, device) -> tuple[Tensor, Tensor]:
    """(B, L) first and last column of the document each position belongs to (by
    `document_ids`, the whole row without them), the last clipped to the row's real tokens
    (padding comes at the end of a row)."""
    j = torch.arange(L, device=device).expand(B, L)
    doc = batch.get("document_ids")
    if doc is None:
        doc = torch.zeros(B, L, dtype=torch.long, device=device)
    new = torch.ones(B, L, dtype=torch.bool, device=device)
    new[:, 1:] = doc[:, 1:] != doc[:, :-1]
    doc_first = torch.cummax(torch.where(new, j, 0), dim=1).values
    last = torch.ones(B, L, dtype=torch.bool, device=device)
    last[:, :-1] = doc[:, 1:] != doc[:, :-1]
    flipped = torch.where(last, j, L - 1).flip(1)
    doc_last = torch.cummin(flipped, dim=1).values.flip(1)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        doc_last = torch.minimum(doc_last, (mask.sum(1, keepdim=True) - 1).expand(B, L))
    return doc_first, doc_last


# --------------------------------------------------------------------------- the dictionary

_RARE_CACHE: dict[tuple, RareWords] = {}


def rare_words_for(data: Path, recipe: Recipe) -> RareWords:
    """The recipe's rare words, counted over the training documents of `data` (those the
    pretraining loader reads: not the held-out ones). Computed once per process and data (the
    objective and each stage's loader ask for it)."""
    o, data = recipe.objective, Path(data)
    manifest = data / "manifest.json"
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else 0
    key = (str(data.resolve()), stamp, recipe.eval.holdout_every, o.notes_threshold,
           o.notes_min_count)
    if key not in _RARE_CACHE:
        loader = SplitLoader(data, LoaderConfig(seq_len=8, batch_size=1),
                             recipe.eval.holdout_every, held_out=False)
        rare = find_rare_words(loader.shards, loader.doc_shard, loader.doc_start,
                               loader.doc_len, o.notes_threshold, o.notes_min_count)
        if len(rare) == 0:
            raise UserError(f"{data}: no word of the training documents occurs at least "
                            f"{o.notes_min_count} (objective.notes_min_count) and fewer than "
                            f"{o.notes_threshold} (objective.notes_threshold) times, so the "
                            "note dictionary would be empty; widen that range")
        while len(_RARE_CACHE) >= 4:
            _RARE_CACHE.pop(next(iter(_RARE_CACHE)))
        _RARE_CACHE[key] = rare
    return _RARE_CACHE[key]
