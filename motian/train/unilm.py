"""UNILM pretraining (Dong, Yang, Wang, Wei, Liu, Wang, Gao, Zhou & Hon 2019, "Unified Language
Model Pre-training for Natural Language Understanding and Generation", arXiv:1905.03197).

``objective.kind: unilm``. One bidirectional Transformer (`UnifiedLM`, a MaskedLM) learns the
cloze task under four self-attention masks: bidirectional (BERT), left-to-right and
right-to-left (each token sees one side and itself), and seq2seq (source tokens see the source;
target tokens see the source and the target to their left). Each row's mode is drawn by the
loader (motian.data.seq2seq_rows.unilm_rows) with `objective.unilm_modes` (the paper's 1/3,
1/3, 1/6, 1/6); this objective turns the batch's `unilm_mode` / `source_length` into the
(B, L, L) visibility (motian.model.masks) and trains exactly as MLM does (`Pretrainer`: the
same token-weighted loss, weighting and statistics). The masked tokens are predicted under
their row's mask.

The common held-out evaluation is the bidirectional cloze (the same rows and masks as every
masked recipe), so UNILM's masked-token numbers compare with theirs. final/ is the UnifiedLM:
`motian finetune` takes its backbone (bidirectional), `motian generate` decodes it as a prefix
LM (motian.serving.prefix_decoding).
"""

from __future__ import annotations

from torch import Tensor

from motian.model.masks import unilm_visibility
from motian.train.objectives import Pretrainer


class UnifiedPretrainer(Pretrainer):
    """`Pretrainer` whose rows carry their attention mode (see the module docstring)."""

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        batch = dict(batch)
        modes, sources = batch.pop("unilm_mode"), batch.pop("source_length")
        batch["attention_mask"] = unilm_visibility(modes, sources, batch["attention_mask"],
                                                   batch["input_ids"].shape[1])
        return super().forward(batch, tokens_per_rank, micro_steps)
