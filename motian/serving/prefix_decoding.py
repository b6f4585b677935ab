"""Decoding state for the two generation-pretrained families beside `CausalLM`: the batch
being decoded, with the same interface as generate.py's `_Sequences` (`ids`, `logits`,
`append`, `reorder`), so greedy decoding, sampling and beam search serve them unchanged.

* `PrefixSequences` - a `UnifiedLM` (UNILM, Dong et al. 2019) as a prefix LM, the way the
  paper decodes its seq2seq mode: the prompt is the source (every prompt token sees the whole
  prompt); the next token is predicted at a [MASK] appended after the tokens so far, which
  sees the prompt, the new tokens and itself; the chosen token then replaces the [MASK].
  With the cache, the prompt is encoded once, bidirectionally (`KVCache(prefix=True)`); each
  step reads the last chosen token and a new [MASK], and the [MASK]'s keys are dropped again.
  Without it, the whole row is recomputed under the (B, L, L) prefix mask (the reference the
  cache is tested against). New tokens are segment 1, as a seq2seq target in pretraining.
* `Seq2SeqSequences` - a `Seq2SeqLM` (MASS, Song et al. 2019): the encoder reads the prompt
  followed by `max_new_tokens` [MASK] - the fragment MASS learned to fill - once; the decoder
  starts at the first [MASK]'s position with a [MASK] input (a fragment's first decoder input
  in pretraining) and reads each chosen token. The cache keeps the decoder's self-attention
  keys and values and the encoder output's cross-attention keys and values; without it the
  encoder and decoder are rerun every step.

A batch of prompts is left-padded as for `CausalLM`; positions count real tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from motian.model.heads import UnifiedLM, masked_lm_logits, prefix_lm_mask
from motian.model.seq2seq import Seq2SeqLM
from motian.model.transformer import KVCache


class GrowingBatch:
    """What every decoding state of a decoder-only model keeps: the left-padded prompts plus
    new tokens (`ids`), their padding `mask`, `positions` counting real tokens only (a prompt
    starts at 0), the KV cache and how many columns it has not read (`unread`). Subclasses
    say how the model reads them (`logits`)."""

    def __init__(self, ids: Tensor, mask: Tensor, cache: KVCache | None, unread: int):
        self.ids, self.mask, self.cache, self.unread = ids, mask, cache, unread
        self.positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P)

    def append(self, tokens: Tensor) -> None:
        """One new column (B,). Rows that have finished get a token too (it is never read)."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        self.unread += 1

    def reorder(self, rows: Tensor) -> None:
        self.ids, self.mask, self.positions = self.ids[rows], self.mask[rows], self.positions[rows]
        if self.cache is not None:
            self.cache.reorder(rows)


class PrefixSequences(GrowingBatch):
    """A UNILM model decoding as a prefix LM (module docstring)."""

    def __init__(self, model: UnifiedLM, ids: Tensor, mask: Tensor, use_cache: bool,
                 mask_id: int):
        # unread: new tokens not yet in the cache (the prompt is read on the first call)
        super().__init__(ids, mask, KVCache(model.config.layers, prefix=True)
                         if use_cache else None, unread=0)
        self.model, self.mask_id = model, mask_id
        self.prefix = ids.shape[1]  # the (left-padded) prompt columns

    def _columns(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The last `n` columns plus a [MASK] after them: ids, padding, positions, segments."""
        B = self.ids.shape[0]
        fill = torch.full((B, 1), self.mask_id, device=self.ids.device)
        ids = torch.cat([self.ids[:, self.ids.shape[1] - n:], fill], 1)
        mask = torch.cat([self.mask[:, self.mask.shape[1] - n:], torch.ones_like(fill)], 1)
        positions = torch.cat([self.positions[:, self.positions.shape[1] - n:],
                               self.positions[:, -1:] + 1], 1)
        first = self.ids.shape[1] - n  # column of ids[:, 0]
        types = (torch.arange(first, first + n + 1, device=ids.device) >= self.prefix).long()
        return ids, mask, positions, types.expand(B, n + 1)

    @torch.no_grad()
    def logits(self) -> Tensor:
        """Next-token logits (B, vocab) in fp32: the MLM head at the appended [MASK]."""
        backbone = self.model.backbone
        if self.cache is None:
            ids, mask, positions, types = self._columns(self.ids.shape[1])
            visible = prefix_lm_mask(torch.full_like(ids[:, 0], self.prefix), ids.shape[1], mask)
            h = backbone(ids, visible, types, positions)
        else:
            if self.cache.length == 0:  # the prompt, both ways, once
                backbone(self.ids, self.mask, torch.zeros_like(self.ids), self.positions,
                         cache=self.cache)
            ids, mask, positions, types = self._columns(self.unread)
            h = backbone(ids, mask, types, positions, cache=self.cache)
            self.cache.truncate(self.cache.length - 1)  # the [MASK] makes way for the token
            self.unread = 0
        return masked_lm_logits(self.model, h[:, -1]).float()

class Seq2SeqSequences:
    """A MASS encoder-decoder writing the masked continuation of prompts (module docstring)."""

    def __init__(self, model: Seq2SeqLM, ids: Tensor, mask: Tensor, use_cache: bool,
                 mask_id: int, max_new_tokens: int):
        B = ids.shape[0]
        fill = torch.full((B, max_new_tokens), mask_id, device=ids.device)
        self.model, self.mask_id = model, mask_id
        self.source = torch.cat([ids, fill], 1)  # (B, P + max_new_tokens)
        self.source_mask = torch.cat([mask, torch.ones_like(fill)], 1)
        self.source_positions = (self.source_mask.cumsum(1) - 1).clamp(min=0)
        start = mask.sum(1, keepdim=True)  # (B, 1): position of the first [MASK]
        self.ids = torch.full((B, 1), mask_id, device=ids.device)  # decoder inputs so far
        self.positions = start
        self.memory = None
        self.cache = KVCache(model.config.layers) if use_cache else None
        self.unread = 1

    @torch.no_grad()
    def logits(self) -> Tensor:
        memory = self.memory
        if memory is None:
            memory = self.model.encode(self.source, self.source_mask,
                                       position_ids=self.source_positions)
            if self.cache is not None:  # encoded once; recomputed every step without a cache
                self.memory = memory
        n = self.unread if self.cache is not None else self.ids.shape[1]
        out = self.model(memory=memory, decoder_input_ids=self.ids[:, -n:],
                         decoder_position_ids=self.positions[:, -n:], cache=self.cache)
        self.unread = 0
        return out.logits[:, -1].float()

    def append(self, tokens: Tensor) -> None:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        self.unread += 1

    def reorder(self, rows: Tensor) -> None:
        self.ids, self.positions = self.ids[rows], self.positions[rows]
        self.source, self.source_mask = self.source[rows], self.source_mask[rows]
        self.source_positions = self.source_positions[rows]
        if self.cache is not None:
            self.cache.reorder(rows)
        if self.memory is not None:
            self.memory.reorder(rows)
