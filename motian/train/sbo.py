"""The span boundary objective (SBO) beside MLM: SpanBERT (Joshi et al. 2020, "SpanBERT:
Improving Pre-training by Representing and Predicting Spans", TACL, arXiv:1907.10529).

Recipe: ``objective: {kind: mlm, sbo: true}`` with span masking (``data.masking: spanbert``);
`motian/configs/spanbert-demo.yaml` is the demo. Every masked token x_i of a span is predicted
twice: by the MLM head from its own output, and by the `SpanBoundaryHead` from the outputs of
the span's two boundary tokens and its position in the span. The loader delivers the boundaries
(`motian.data.spans`: a span is a maximal run of masked tokens in a row; one that ends at the
row's last column uses that column as its right boundary), so SBO has one target per masked
token and its loss is a mean over the same tokens as MLM's:

    L = w_mlm * L_mlm + w_sbo * L_sbo     (fixed weights 1 : 1 as in the paper, `weights.sbo`;
                                           or learned with weighting: uncertainty)

The last block runs on the masked rows and the boundary rows only (one encoder pass). The head
is the objective's, not the model's: checkpoints save it (objective.safetensors) and resume it
exactly, and final/ holds the plain MaskedLM that fine-tuning loads, as SpanBERT's released
models drop it. Logged: loss_sbo, acc_sbo beside loss_mlm, acc_mlm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from motian.errors import UserError
from motian.model.sbo import SpanBoundaryHead, output_embedding
from motian.train.mlm_rows import encode_rows, mlm_pair_terms
from motian.train.objectives import Pretrainer, TaskWeighting

BATCH_KEYS = ("sbo_left", "sbo_right", "sbo_offset")


class SpanBoundaryPretrainer(Pretrainer):
    """`Pretrainer` (MLM, optional pair task, task weighting, held-out evaluation) plus the
    span boundary head and its loss (task "sbo" of the weighting)."""

    def __init__(self, model, weighting: TaskWeighting, evalset=None, pair_evalset=None,
                 max_span: int = 32):
        super().__init__(model, weighting, evalset, pair_evalset)
        if "sbo" not in weighting.tasks:
            raise UserError("the span boundary objective needs the task weighting to include "
                            "'sbo' (task_names with objective.sbo: true)")
        self.sbo = SpanBoundaryHead(model.config, max_span)

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise UserError(f"the batch has no {', '.join(missing)}: the span boundary "
                            "objective needs a loader built with span_boundaries=True")
        n = len(batch["mlm_positions"])
        rows = torch.cat([batch["sbo_left"], batch["sbo_right"]])  # (2N,) flat
        masked, cls, ends = encode_rows(self.model, batch, rows)  # ends: (2N, hidden)
        losses, stats = mlm_pair_terms(self.model, masked, cls, batch, tokens_per_rank,
                                       micro_steps)
        y = self.sbo(ends[:n], ends[n:], batch["sbo_offset"])  # (N, hidden)
        logits = self.sbo.logits(y, output_embedding(self.model)).float()  # (N, vocab)
        labels = batch["mlm_labels"]
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        losses["sbo"] = loss_sum / tokens_per_rank
        stats["sbo_loss_sum"] = loss_sum.detach()
        stats["sbo_tokens"] = stats["mlm_tokens"]
        stats["sbo_correct"] = (logits.detach().argmax(-1) == labels).sum().float()
        return self.weighting(losses, 1.0 / micro_steps), stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        values = super().summarise(sums)
        if sums.get("sbo_tokens"):
            values["loss_sbo"] = sums["sbo_loss_sum"] / sums["sbo_tokens"]
            values["acc_sbo"] = sums["sbo_correct"] / sums["sbo_tokens"]
        return values
