"""Replaced-token objectives: ELECTRA and MC-BERT, on the one training loop.

* ``objective.kind: electra`` (Clark, Luong, Le & Manning 2020, "ELECTRA: Pre-training Text
  Encoders as Discriminators Rather Than Generators", arXiv:2003.10555). A small masked-LM
  generator (`motian.model.electra.Generator`, `generator_width` x the discriminator's heads,
  hidden and FFN, `generator_depth` x its layers, sharing its token embeddings) predicts the
  masked tokens; each masked position is then filled with a token *sampled* from the
  generator's softmax (no gradient through the sample), and the discriminator
  (`ReplacedTokenDetection`) reads the corrupted row and says at every real token whether it
  was replaced. A sample equal to the original counts as original.
  ``loss = MLM(generator) + rtd_weight * RTD(discriminator)`` (lambda = 50 in the paper).
* ``objective.kind: mc-bert`` (Xu, Sun, Ge, Li, Qin & Liu 2020, "MC-BERT: Efficient Language
  Pre-Training via a Meta Controller", arXiv:2006.05744). The same corruption, and for every
  masked position `candidates` (k) tokens: the original and k - 1 distinct others drawn from the
  generator's softmax without replacement. The main model scores each candidate by the dot
  product of its output (through BERT's MLM transform) with the candidate's tied embedding and
  picks among the k by softmax: ``loss = MLM(gen) + CE(multi-choice) + rtd_weight * RTD``.

**Loss units.** The loop weighs losses by masked tokens (`units`): the generator MLM and the
multi-choice loss are their sums over masked tokens / masked tokens of the global batch, as
`Pretrainer`'s MLM. Replaced-token detection is over every real token instead: its sum over a
micro-batch's real tokens is divided by the micro-batch's rows x length and by the number of
micro-batches, so every token of the step weighs 1 / (rows x length of the step) whatever
micro-batch or process it lands in (the gradient does not depend on the split). With packed
rows (no padding but in an epoch's last row) that is the mean over real tokens, as in ELECTRA.

**Exact resume.** The generator's weights are trained tensors outside `model`, so every
checkpoint holds them (`Objective.extra_state`) and its optimizer moments; the samples are
drawn from the global generator, which the loop reseeds before every micro-batch.

**What final/ holds.** The discriminator alone, a plain `ReplacedTokenDetection` directory:
`motian finetune --model run/final`, distill and export read its backbone like any other. The
generator is not written there (both papers discard it after pretraining, and a final/ that
is one ordinary model keeps every downstream verb unaware of ELECTRA); it is in every
checkpoint, the last one included, for `--resume`.

**Held-out evaluation.** The common one (`evaluate_lm`: loss / accuracy / tokens on the
fixed held-out masked rows) needs a full-vocabulary MLM head, which only the generator has, so
those three numbers are the *generator's*. Beside them `evaluate_replaced` corrupts the same
rows with generator samples drawn from a fixed seed (the same corruption for the same
generator) and reports the discriminator's replaced-token detection: accuracy, ROC AUC,
precision and recall of "replaced", the share of tokens replaced (1 - it is the accuracy of
always answering "original"), and for MC-BERT the multi-choice accuracy against chance 1/k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from motian.errors import UserError
from motian.model.electra import (
    Generator,
    corrupt,
    generator_config,
    sample_candidates,
    sample_replacements,
)
from motian.model.heads import ReplacedTokenDetection
from motian.train.distributed import DistInfo, all_reduce_sum
from motian.train.fit import Objective
from motian.train.objectives import evaluate_lm, predicted_tokens
from motian.train.recipe import ObjectiveSpec

KINDS = ("electra", "mc-bert")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "document_ids")
EVAL_SEED = 2020  # the held-out corruption's own stream (batch i draws from EVAL_SEED + i)
AUC_BINS, AUC_RANGE = 4096, 16.0  # score histograms over logits in [-16, 16] for the AUC


class ReplacedTokens(Objective):
    """ELECTRA / MC-BERT: generator + discriminator (`model`); see the module docstring."""

    def __init__(self, model: ReplacedTokenDetection, spec: ObjectiveSpec,
                 evalset: list[dict[str, Tensor]] | None = None):
        super().__init__()
        if spec.kind not in KINDS:
            raise UserError(f"objective.kind {spec.kind!r} is not one of {', '.join(KINDS)}")
        self.model = model
        self.multi_choice = spec.kind == "mc-bert"
        if self.multi_choice and model.mlm is None:
            raise UserError("objective.kind mc-bert needs ReplacedTokenDetection(..., "
                            "multi_choice=True): its candidates are scored by the MLM head")
        vocab = model.config.vocab_size
        if self.multi_choice and spec.candidates > vocab:
            raise UserError(f"objective.candidates ({spec.candidates}) exceeds the vocabulary "
                            f"({vocab} tokens): there are not that many distinct candidates")
        # Built after the discriminator from the same seeded stream: the same weights on every
        # rank and every run.
        self.generator = Generator(
            generator_config(model.config, spec.generator_width, spec.generator_depth),
            model.backbone.embeddings.word)
        self.rtd_weight = float(spec.rtd_weight)
        self.k = spec.candidates
        self.evalset = evalset or []

    def units(self, batch: dict[str, Tensor]) -> float:
        return float(predicted_tokens(batch))

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        positions, original = batch["mlm_positions"], batch["mlm_labels"]  # (N,) each
        gen_logits = self.generator(**inputs, mlm_positions=positions).logits.float()  # (N, V)
        gen_sum = F.cross_entropy(gen_logits, original, reduction="sum")
        sampled = sample_replacements(gen_logits.detach())
        corrupted, replaced = corrupt(inputs["input_ids"], positions, original, sampled)
        out = self.model(**{**inputs, "input_ids": corrupted})
        real = _real_tokens(inputs)  # (B, L) bool
        rtd = F.binary_cross_entropy_with_logits(out.logits, replaced.float(), reduction="none")
        rtd_sum = (rtd * real).sum()
        loss = (gen_sum / tokens_per_rank
                + self.rtd_weight * rtd_sum / real.numel() / micro_steps)
        said_replaced = out.logits.detach() > 0
        stats = {"mlm_loss_sum": gen_sum.detach(), "mlm_tokens": _count(original.numel()),
                 "mlm_correct": (gen_logits.detach().argmax(-1) == original).sum().float(),
                 "rtd_loss_sum": rtd_sum.detach(), "rtd_tokens": real.sum().float(),
                 "rtd_correct": ((said_replaced == replaced) & real).sum().float(),
                 "rtd_replaced": (replaced & real).sum().float()}
        if self.multi_choice:
            h = out.hidden_states.flatten(0, 1)[positions]  # (N, hidden) at masked positions
            candidates = sample_candidates(gen_logits.detach(), original, self.k)  # (N, k)
            choice = self.model.choice_logits(h, candidates).float()  # (N, k)
            target = torch.zeros_like(original)  # the original is column 0
            mc_sum = F.cross_entropy(choice, target, reduction="sum")
            loss = loss + mc_sum / tokens_per_rank
            stats.update({"mc_loss_sum": mc_sum.detach(), "mc_tokens": _count(original.numel()),
                          "mc_correct": (choice.detach().argmax(-1) == 0).sum().float()})
        return loss, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """loss_mlm / acc_mlm: the generator's; loss_rtd / acc_rtd: the discriminator's over
        real tokens; replaced: the share of real tokens that were replaced; loss_mc / acc_mc:
        MC-BERT's multi-choice; loss: the weighted total of those means."""
        values: dict[str, float] = {}
        for task in ("mlm", "rtd", "mc"):
            n = sums.get(f"{task}_tokens", 0.0)
            if n:
                values[f"loss_{task}"] = sums[f"{task}_loss_sum"] / n
                values[f"acc_{task}"] = sums[f"{task}_correct"] / n
        if sums.get("rtd_tokens"):
            values["replaced"] = sums["rtd_replaced"] / sums["rtd_tokens"]
        if "loss_mlm" in values and "loss_rtd" in values:
            values["loss"] = (values["loss_mlm"] + values.get("loss_mc", 0.0)
                              + self.rtd_weight * values["loss_rtd"])
        return values

    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if not self.evalset:
            return None
        result = evaluate_lm(self.generator, self.evalset, info, autocast)  # the generator's
        result.update(evaluate_replaced(self, self.evalset, info, autocast))
        return result


def _real_tokens(inputs: dict[str, Tensor]) -> Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def _count(n: int) -> Tensor:
    return torch.tensor(float(n))


@torch.no_grad()
def evaluate_replaced(objective: ReplacedTokens, batches: list[dict], info: DistInfo,
                      autocast) -> dict[str, float]:
    """The discriminator on the held-out rows, corrupted by the generator with a fixed seed
    per batch (so the numbers do not depend on the number of processes): replaced-token
    detection accuracy, ROC AUC, precision and recall of "replaced", the replaced share, and
    MC-BERT's multi-choice accuracy. Only sums cross processes: the AUC comes from histograms
    of the logits (4096 bins over [-16, 16]; ties within a bin count one half)."""
    models = (objective.model, objective.generator)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    sums = torch.zeros(7, dtype=torch.float64)  # tokens, correct, replaced, said, hit, mc n/ok
    hist = torch.zeros(2, AUC_BINS, dtype=torch.float64)  # [original, replaced] logit counts
    for i in range(info.rank, len(batches), info.world_size):
        batch = {k: v.to(info.device) for k, v in batches[i].items()}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        positions, original = batch["mlm_positions"], batch["mlm_labels"]
        stream = torch.Generator(device=info.device).manual_seed(EVAL_SEED + i)
        with autocast:
            gen_logits = objective.generator(**inputs, mlm_positions=positions).logits.float()
            sampled = sample_replacements(gen_logits, stream)
            corrupted, replaced = corrupt(inputs["input_ids"], positions, original, sampled)
            out = objective.model(**{**inputs, "input_ids": corrupted})
        real = _real_tokens(inputs)
        logits, said = out.logits.float(), out.logits.float() > 0
        sums[:5] += torch.stack([real.sum(), ((said == replaced) & real).sum(),
                                 (replaced & real).sum(), (said & real).sum(),
                                 (said & replaced & real).sum()]).double().cpu()
        bins = ((logits + AUC_RANGE) / (2 * AUC_RANGE) * AUC_BINS).long().clamp(0, AUC_BINS - 1)
        for row, which in enumerate((~replaced & real, replaced & real)):
            hist[row] += torch.bincount(bins[which], minlength=AUC_BINS).double().cpu()
        if objective.multi_choice:
            h = out.hidden_states.flatten(0, 1)[positions]
            candidates = sample_candidates(gen_logits, original, objective.k, stream)
            choice = objective.model.choice_logits(h, candidates).float()
            sums[5] += original.numel()
            sums[6] += float((choice.argmax(-1) == 0).sum())
    all_reduce_sum(sums, info)
    all_reduce_sum(hist, info)
    for m, mode in zip(models, modes):
        m.train(mode)
    tokens, correct, replaced_n, said_n, hit = (float(v) for v in sums[:5])
    result = {"rtd_accuracy": correct / max(tokens, 1.0), "rtd_auc": _auc(hist[0], hist[1]),
              "rtd_precision": hit / max(said_n, 1.0), "rtd_recall": hit / max(replaced_n, 1.0),
              "rtd_replaced": replaced_n / max(tokens, 1.0), "rtd_tokens": int(tokens)}
    if objective.multi_choice:
        result.update({"mc_accuracy": float(sums[6]) / max(float(sums[5]), 1.0),
                       "mc_chance": 1.0 / objective.k})
    return result


def replaced_eval_line(e: dict) -> str:
    """The held-out result of `evaluate_replaced` in one line (`motian pretrain` prints it)."""
    line = (f"(masked-token numbers: the generator's) held-out replaced-token detection "
            f"accuracy {e['rtd_accuracy']:.2%} (always 'original': {1 - e['rtd_replaced']:.2%}),"
            f" AUC {e['rtd_auc']:.3f}, precision {e['rtd_precision']:.2%}, recall "
            f"{e['rtd_recall']:.2%}")
    if "mc_accuracy" in e:
        line += f"; multi-choice accuracy {e['mc_accuracy']:.2%} (chance {e['mc_chance']:.0%})"
    return line


def _auc(negative: Tensor, positive: Tensor) -> float:
    """P(score of a replaced token > score of an original one), ties one half, from two
    histograms over the same bins; 0.5 when either class is empty."""
    n_neg, n_pos = float(negative.sum()), float(positive.sum())
    if not n_neg or not n_pos:
        return 0.5
    below = torch.cumsum(negative, 0) - negative  # originals in lower bins
    return float((positive * (below + 0.5 * negative)).sum()) / (n_neg * n_pos)
