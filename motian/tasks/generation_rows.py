"""Generation-task batches for the two generation-pretrained families that are not left-to-right
decoders: what a `collate("generation", ...)` batch ([CLS] source [SEP] target [SEP], labels on
the target and the final [SEP]) becomes before a UNILM or MASS model reads it in fine-tuning.
Each is made to match how `motian.serving.prefix_decoding` decodes that family, so the model
is fine-tuned on the attention it will generate with.

* `unilm_rows` (UNILM, Dong et al. 2019, arXiv:1905.03197, section 2.3 "fine-tuning"): the
  row under the seq2seq self-attention mask (the source sees the source, both ways; a target
  token sees the source and the target up to itself), target tokens as segment 1, and a share
  of the target tokens (the final [SEP] among them) replaced by [MASK] and predicted: the
  paper's "randomly mask some percentage of tokens in the target sequence, and learn to
  recover the masked words". Decoding then predicts each next token at an appended [MASK].
* `mass_rows` (MASS, Song et al. 2019, arXiv:1905.02450): the encoder reads the prompt
  ([CLS] source [SEP]) followed by `fill` [MASK] - the masked fragment it learned to
  restore, as many as the decoder may write at generation time (so the number of [MASK]s
  tells nothing about the target's length, at training as at decoding); the decoder reads
  [MASK] then the target shifted right, at the fragment's positions (after the prompt), and
  predicts the target and the final [SEP].

Layer 4 (tasks): tensors in, tensors out; the models' classes are not needed here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from motian.model.heads import prefix_lm_mask

IGNORE = -100
# UNILM's share of target tokens masked in seq2seq fine-tuning (the paper's 0.7 for abstractive
# summarisation, its closest task to headline generation).
UNILM_TARGET_MASK_RATE = 0.7


def _prompt_lengths(labels: Tensor) -> Tensor:
    """(B,) the prompt's length of each row: the index of its first target label."""
    target = labels != IGNORE
    return torch.where(target.any(1), target.int().argmax(1), labels.new_zeros(()))


def unilm_rows(batch: dict[str, Tensor], mask_id: int, rate: float = UNILM_TARGET_MASK_RATE,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The UNILM seq2seq fine-tuning inputs of a generation batch: `input_ids` with a `rate`
    share of each row's target tokens (at least one) replaced by [MASK], the (B, L, L) seq2seq
    `attention_mask`, `token_type_ids` 1 on the target, and `labels` on the masked tokens."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels != IGNORE
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = (draw < rate) & target
    empty = target.any(1) & ~chosen.any(1)  # a row none of whose target tokens was drawn
    if bool(empty.any()):  # its least-drawn target token, so every row is trained on
        first = draw.masked_fill(~target, 2.0).argmin(1)
        chosen[empty, first[empty]] = True
    prefix = _prompt_lengths(labels)
    L = ids.shape[1]
    after = torch.arange(L, device=ids.device)[None, :] >= prefix[:, None]
    return {"input_ids": ids.masked_fill(chosen, mask_id),
            "attention_mask": prefix_lm_mask(prefix, L, mask),
            "token_type_ids": (after & mask.bool()).long(),
            "labels": labels.masked_fill(~chosen, IGNORE)}


def mass_rows(batch: dict[str, Tensor], mask_id: int, pad_id: int, fill: int,
              max_length: int) -> dict[str, Tensor]:
    """The MASS fine-tuning inputs of a generation batch: the encoder's prompt + `fill` [MASK]
    (the prompt cut, keeping its [SEP], to leave room for them within `max_length`, as the
    decoder's prompts are), and the decoder's [MASK] + target shifted right at the positions
    after the prompt, with the target and the final [SEP] as `decoder_labels`."""
    ids, labels = batch["input_ids"], batch["labels"]
    prefix = _prompt_lengths(labels).tolist()
    keep = max(max_length - fill - 1, 3)
    enc, dec, pos, lab = [], [], [], []
    for row, label, p in zip(ids.tolist(), labels.tolist(), prefix):
        prompt = row[:p] if p <= keep else row[:keep - 1] + [row[p - 1]]
        target = [t for t in label[p:] if t != IGNORE]
        enc.append(prompt + [mask_id] * fill)
        dec.append([mask_id] + target[:-1])
        pos.append(list(range(len(prompt), len(prompt) + len(target))))
        lab.append(target)

    def pad(rows: list[list[int]], value: int) -> Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=ids.device)

    return {"input_ids": pad(enc, pad_id),
            "attention_mask": pad([[1] * len(r) for r in enc], 0),
            "decoder_input_ids": pad(dec, pad_id),
            "decoder_attention_mask": pad([[1] * len(r) for r in dec], 0),
            "decoder_position_ids": pad(pos, 0),
            "decoder_labels": pad(lab, IGNORE)}
