"""XLNet pretraining (Yang et al. 2019, arXiv:1906.08237): ``objective.kind: xlnet`` with
``objective.xlnet_k: K`` (recipe `motian/configs/xlnet-demo.yaml`; docs/objectives.md).

The batches are the packed rows read whole (`causal_batches`, as a decoder reads them: no
[MASK] anywhere). For each micro-batch this objective draws every row's factorisation order,
keeps the last ceil(n / K) tokens of the order as the ones to predict (partial prediction) and
runs `XLNetLM`'s two streams (motian.model.xlnet); the loss is the cross-entropy of those
tokens read from the query stream.

**Loss units** are predicted tokens: a micro-batch contributes its summed token losses / the
step's predicted tokens per rank (`units` counts them from the padding alone, before any order
is drawn), so the gradient does not depend on how the step is split into micro-batches.

**Exact resume.** The orders are drawn from the global torch generator, which the loop
reseeds before every micro-batch from the seed, the step and the batch's first row (as
ELECTRA's samples and dropout), so a resumed run draws the same orders.

**Held-out evaluation.** The common held-out rows (every `eval.holdout_every`-th document,
`eval.rows` rows of `eval.seq_len`), read whole, with orders drawn once from `eval.seed`: the
same orders for every run and every evaluation. Reported: loss, accuracy and perplexity of the
predicted tokens (`evaluate_lm` over the prepared rows).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from motian.model.xlnet import XLNetLM, predicted_counts, prediction_targets, sample_order
from motian.train.distributed import DistInfo
from motian.train.fit import Objective
from motian.train.objectives import (
    causal_inputs,
    evaluate_lm,
    mlm_pair_losses,
    token_summary,
)


def permuted(batch: dict[str, Tensor], k: int, generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
    """XLNetLM's inputs for `batch` (unmasked rows) with a fresh factorisation order per row
    (from `generator`, or the global one), and the tokens to predict as `mlm_labels` (N,)."""
    inputs = causal_inputs(batch)
    rank = sample_order(inputs["attention_mask"], generator)
    positions, valid = prediction_targets(rank, inputs["attention_mask"], k)
    inputs.update(rank=rank, positions=positions, valid=valid,
                  mlm_labels=inputs["input_ids"].take_along_dim(positions, dim=1)[valid])
    return inputs


class PermutationLM(Objective):
    """The permutation LM's loss over the predicted tokens (module docstring)."""

    def __init__(self, model: XLNetLM, k: int, evalset: list[dict[str, Tensor]] | None = None):
        super().__init__()
        self.model, self.k = model, k
        self.evalset = evalset or []

    def units(self, batch: dict[str, Tensor]) -> float:
        return float(predicted_counts(batch["attention_mask"], self.k).sum())

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = permuted(batch, self.k)
        labels = inputs.pop("mlm_labels")
        logits = self.model(**inputs).logits
        losses, stats = mlm_pair_losses(logits, None, labels, None, None, tokens_per_rank,
                                        micro_steps)
        return losses["mlm"], {name.replace("mlm", "plm"): v for name, v in stats.items()}

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        return token_summary(sums, "plm")

    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if not self.evalset:
            return None
        result = evaluate_lm(self.model, self.evalset, info, autocast)
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
        return result


def xlnet_eval_batches(rows: list[dict[str, Tensor]], k: int, seed: int
                       ) -> list[dict[str, Tensor]]:
    """The held-out rows (unmasked, `eval_batches(..., causal=True)`) with their orders drawn
    once from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [permuted(batch, k, generator) for batch in rows]
