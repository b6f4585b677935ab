"""MASS pretraining (Song, Tan, Qin, Lu & Liu 2019, "MASS: Masked Sequence to Sequence
Pre-training for Language Generation", arXiv:1905.02450).

``objective.kind: mass``. An encoder-decoder (`Seq2SeqLM`, motian.model.seq2seq) reads a row
whose contiguous fragment (`objective.mass_span` of its tokens, 50% in the paper) is replaced
by [MASK]; the decoder, fed the fragment shifted right with every other position [MASK]
(motian.data.seq2seq_rows.mass_rows), predicts the fragment with teacher forcing. Masking the
decoder's view of the tokens the encoder sees forces it to lean on the encoder; masking them on
the encoder side forces the encoder to understand the unmasked ones (paper, section 2.2).

**Loss units** are fragment tokens: a micro-batch contributes its summed token losses / the
step's fragment tokens per rank, so the gradient does not depend on the micro-batch split.

**Held-out evaluation**: the held-out documents (every `eval.holdout_every`-th) packed at
`eval.seq_len`, fragments drawn with the fixed `eval.seed`: fragment-token loss, accuracy and
perplexity. final/ is the Seq2SeqLM: `motian generate` decodes it (the encoder reads the
prompt followed by [MASK]s, the decoder writes the fragment), `motian finetune` takes its
encoder (`backbone`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from motian.data.loader import LoaderConfig
from motian.data.splits import SplitLoader, mass_batches
from motian.model.seq2seq import Seq2SeqLM
from motian.train.distributed import DistInfo
from motian.train.fit import Objective
from motian.train.objectives import held_out_sums, token_summary
from motian.train.recipe import EvalSpec

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
                "decoder_labels")


class MaskedSeq2Seq(Objective):
    """MASS: the fragment's cross-entropy under teacher forcing (module docstring)."""

    def __init__(self, model: Seq2SeqLM, evalset: list[dict[str, Tensor]] | None = None):
        super().__init__()
        self.model = model
        self.evalset = evalset or []

    def units(self, batch: dict[str, Tensor]) -> float:
        return float((batch["decoder_labels"] != -100).sum())

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(**{k: batch[k] for k in MODEL_INPUTS})
        labels = batch["decoder_labels"]
        labels = labels[labels != -100]  # (N,), the order of out.logits' rows
        token_sum = F.cross_entropy(out.logits.float(), labels, reduction="sum")
        stats = {"mass_loss_sum": token_sum.detach(), "mass_tokens": torch.tensor(
            float(labels.numel())), "mass_correct": (out.logits.detach().argmax(-1) == labels)
            .sum().float()}
        return token_sum / tokens_per_rank, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        return token_summary(sums, "mass")

    @torch.no_grad()
    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if not self.evalset:
            return None
        def add(batch: dict[str, Tensor]) -> list[float]:  # loss sum, correct, tokens
            with autocast:
                logits = self.model(**{k: batch[k] for k in MODEL_INPUTS}).logits.float()
            labels = batch["decoder_labels"]
            labels = labels[labels != -100]
            return [float(F.cross_entropy(logits, labels, reduction="sum")),
                    float((logits.argmax(-1) == labels).sum()), labels.numel()]

        sums = held_out_sums(self.model, self.evalset, info, 3, add)
        n = max(float(sums[2]), 1.0)
        loss = float(sums[0]) / n
        return {"loss": loss, "accuracy": float(sums[1]) / n, "tokens": int(sums[2]),
                "perplexity": math.exp(min(loss, 50.0))}


def mass_eval_batches(data: Path, spec: EvalSpec, span: float) -> list[dict[str, Tensor]]:
    """The held-out rows with fragments drawn from `spec.seed` (the same for every run)."""
    config = LoaderConfig(seq_len=spec.seq_len, batch_size=spec.batch, seed=spec.seed,
                          mass_span=span)
    loader = SplitLoader(data, config, spec.holdout_every, held_out=True)
    n = min(max(spec.rows // spec.batch, 1), loader.steps_per_epoch)
    batches = mass_batches(loader)
    return [next(batches) for _ in range(n)]
