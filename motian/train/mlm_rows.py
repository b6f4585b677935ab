"""MLM (+ pair task) losses of a batch whose encoder outputs an auxiliary objective also reads:
what the span boundary objective (`motian.train.sbo`) and the note dictionary
(`motian.train.notes`) share.

`Pretrainer.forward` calls the model's own forward, which returns the masked rows only. An
auxiliary objective needs more of the last layer (the span boundaries; the windows around rare
words), so `encode_rows` asks the backbone for the [CLS] rows of a pair model, the masked rows
and any extra rows in one pass (or the whole (B, L) output), and `mlm_pair_terms` computes the
same losses and statistics as `Pretrainer.forward` from them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from motian.model import PreTrainingModel
from motian.model.heads import masked_lm_logits
from motian.train.objectives import mlm_pair_losses

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "document_ids")


def encode_rows(model: nn.Module, batch: dict[str, Tensor], extra_rows: Tensor | None = None,
                full: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(masked rows (N, hidden), [CLS] rows (B, 1, hidden) of a pair model or None, extra):
    extra is the rows at flat `extra_rows` (E, hidden), or with `full` the whole last layer
    (B, L, hidden). Without `full`, the last block runs on the rows asked for only (see
    `MotianModel.forward`)."""
    B, L = batch["input_ids"].shape
    positions = batch["mlm_positions"]
    pair = isinstance(model, PreTrainingModel)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if full:
        h = model.encode(**inputs)  # (B, L, hidden)
        return h.reshape(B * L, -1)[positions], (h[:, :1] if pair else None), h
    parts = ([torch.arange(B, device=positions.device) * L] if pair else []) + [positions]
    if extra_rows is not None:
        parts.append(extra_rows)
    h = model.encode(**inputs, output_positions=torch.cat(parts))  # (B? + N + E, hidden)
    start = B if pair else 0
    masked = h[start:start + len(positions)]
    extra = h[start + len(positions):] if extra_rows is not None else None
    return masked, (h[:B, None] if pair else None), extra


def mlm_pair_terms(model: nn.Module, masked: Tensor, cls: Tensor | None,
                   batch: dict[str, Tensor], tokens_per_rank: float, micro_steps: int
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(losses, statistics) of MLM and, with `cls`, the pair task, as `Pretrainer.forward`
    makes them: the token loss sum over the step's tokens per rank; the pair loss one
    micro-batch's share of the weighted mean."""
    pair_labels = batch.get("pair_labels")
    return mlm_pair_losses(masked_lm_logits(model, masked),
                           model.pair(cls) if cls is not None else None,
                           labels=batch["mlm_labels"], pair_labels=pair_labels,
                           pair_weights=batch.get("pair_weights"),
                           tokens_per_rank=tokens_per_rank, micro_steps=micro_steps)
