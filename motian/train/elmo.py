"""ELMo's biLM pretraining: ``objective.kind: elmo`` (motian.model.elmo; recipe
`motian/configs/elmo-demo.yaml`; docs/knowledge.md, "ELMo (feature-based)").

The batches are the packed rows read whole (`causal_batches`, as the causal LM reads them). The
loss is the sum of both directions' token losses (the paper maximises the joint log likelihood
of the forward and backward LMs), per step over the step's predicted tokens of both directions
(`units`), so the gradient does not depend on how a step is split into micro-batches.

**Document boundaries.** The LSTM states run on across the documents packed into a row (as a
causal LM with `cross_document_attention: true` attends across them), but no prediction
crosses a boundary: the forward LM does not predict a document's first token from the document
before, the backward LM not the last token of a document from the one after
(`motian.model.elmo.bilm_targets`). A recipe keeping documents apart
(`data.cross_document_attention: false`) is refused: resetting the states per document is not
implemented.

**Held-out evaluation.** The common held-out rows of the causal LM (`eval_batches(...,
causal=True)`); reported: loss, accuracy and perplexity over both directions, and each
direction's (`loss_forward`, `perplexity_forward`, `loss_backward`, `perplexity_backward`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from motian.errors import UserError
from motian.model.elmo import ElmoLM
from motian.train.distributed import DistInfo
from motian.train.fit import Objective
from motian.train.objectives import held_out_sums

DIRECTIONS = ("forward", "backward")


def check_elmo_recipe(recipe) -> None:
    """The recipe settings ELMo cannot train with, each a UserError naming its field."""
    name = recipe.name
    if recipe.data.pair_task != "none":
        raise UserError(f"recipe {name}: objective.kind elmo trains no pair task; set "
                        f"data.pair_task: none (got {recipe.data.pair_task})")
    if not recipe.data.cross_document_attention:
        raise UserError(f"recipe {name}: objective.kind elmo runs its LSTM states across the "
                        "documents of a packed row (no prediction crosses a boundary); set "
                        "data.cross_document_attention: true")
    for stage in recipe.stages:
        if stage.layers:
            raise UserError(f"recipe {name}: stages[].layers (progressive stacking) is for "
                            "Transformers; remove it for objective.kind elmo")


class BiLMObjective(Objective):
    """Forward + backward LM loss of an `ElmoLM` (module docstring)."""

    def __init__(self, model: ElmoLM, evalset: list[dict[str, Tensor]] | None = None):
        super().__init__()
        self.model, self.evalset = model, evalset or []

    def units(self, batch: dict[str, Tensor]) -> float:
        # Both directions predict as many tokens: every labelled token after position 0.
        return 2.0 * float((batch["labels"][:, 1:] != -100).sum())

    def forward(self, batch: dict[str, Tensor], units_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        half = torch.tensor(self.units(batch) / 2)
        stats = {"tokens": half}
        for d in DIRECTIONS:
            stats[f"{d}_loss_sum"] = out.losses[d].detach()
            stats[f"{d}_correct"] = out.losses[f"{d}_correct"]
        return out.loss / units_per_rank, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        return direction_summary([sums.get(f"{d}_loss_sum", 0.0) for d in DIRECTIONS],
                                 [sums.get(f"{d}_correct", 0.0) for d in DIRECTIONS],
                                 sums.get("tokens", 0.0))

    @torch.no_grad()
    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if not self.evalset:
            return None
        def add(batch: dict[str, Tensor]) -> list[float]:  # loss fwd, bwd, correct x2, tokens
            with autocast:
                out = self.model(batch["input_ids"], batch["attention_mask"],
                                 labels=batch["labels"])
            return [float(out.losses["forward"]), float(out.losses["backward"]),
                    float(out.losses["forward_correct"]), float(out.losses["backward_correct"]),
                    self.units(batch) / 2]

        sums = held_out_sums(self.model, self.evalset, info, 5, add)
        result = direction_summary(sums[:2].tolist(), sums[2:4].tolist(), float(sums[4]))
        result = {"loss": result["loss"], "accuracy": result["acc"],
                  "perplexity": result["ppl"], "tokens": int(sums[4]) * 2,
                  **{k: v for k, v in result.items() if k not in ("loss", "acc", "ppl")}}
        return result


def direction_summary(loss_sums: list[float], correct: list[float], tokens: float
                      ) -> dict[str, float]:
    """loss / acc / ppl over both directions and loss_<d> / perplexity_<d> of each, from the
    summed token losses and correct predictions of `tokens` tokens per direction."""
    if not tokens:
        return {}
    loss = sum(loss_sums) / (2 * tokens)
    out = {"loss": loss, "acc": sum(correct) / (2 * tokens), "ppl": math.exp(min(loss, 50.0))}
    for d, s in zip(DIRECTIONS, loss_sums):
        out[f"loss_{d}"] = s / tokens
        out[f"perplexity_{d}"] = math.exp(min(s / tokens, 50.0))
    return out


def build_elmo_objective(recipe, evalset: list[dict[str, Tensor]], vocab_size: int
                         ) -> BiLMObjective:
    """The recipe's ElmoLM (model.hidden: embedding and projection size, model.ffn: LSTM cells
    per direction, model.layers: LSTM layers) in its objective, with the causal LM's held-out
    rows (`motian.pretraining.eval_batches(..., causal=True)`)."""
    check_elmo_recipe(recipe)
    torch.manual_seed(recipe.seed)
    return BiLMObjective(ElmoLM(recipe.model.build(vocab_size)), evalset)
