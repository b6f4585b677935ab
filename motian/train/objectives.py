"""Pretraining objectives: which head a recipe trains and how its task losses combine.

Owns `build_model` (MaskedLM, PreTrainingModel for MLM + pair task, CausalLM for decoders),
`TaskWeighting` (fixed weights, or learned uncertainty weighting, Kendall, Gal & Cipolla 2018,
"Multi-Task Learning Using Uncertainty to Weigh Losses", arXiv:1705.07115) and `Pretrainer`,
the module the loop differentiates: model + weighting in one `nn.Module`, so DDP all-reduces
the learned log-variances with the weights and one optimizer owns both.

**Token-weighted micro-batches.** The MLM loss of a step is the mean over *all* masked tokens of
the global batch. Each micro-batch therefore contributes ``sum of its token losses / masked
tokens in the global batch`` (the count is known before the first backward: the loop draws a
step's micro-batches first and all-reduces the count). The gradient is then the same however
the global batch is split into micro-batches and processes, which a per-micro-batch mean would
not give (micro-batches hold different numbers of masked tokens).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from motian.errors import UserError
from motian.model import CausalLM, LoadReport, MaskedLM, ModelConfig, PreTrainingModel
from motian.model.heads import ReplacedTokenDetection, UnifiedLM, pair_loss_sum
from motian.model.seq2seq import Seq2SeqLM
from motian.model.xlnet import XLNetLM
from motian.train.distributed import DistInfo, all_reduce_sum
from motian.train.fit import Objective
from motian.train.recipe import ObjectiveSpec


def task_names(objective: ObjectiveSpec, pair_task: str) -> list[str]:
    if objective.kind == "causal":
        return ["lm"]
    tasks = ["mlm"] if pair_task == "none" else ["mlm", "pair"]
    return tasks + ["sbo"] if objective.sbo else tasks  # span boundaries: motian.train.sbo


def build_model(config: ModelConfig, objective: ObjectiveSpec, pair_task: str) -> nn.Module:
    """The head the objective needs: a pair task adds [CLS] classification to MLM."""
    if objective.kind == "causal":
        return CausalLM(config)
    if objective.kind in ("electra", "mc-bert"):  # the discriminator, see train/replaced.py
        if pair_task != "none":
            raise UserError(f"objective.kind {objective.kind} trains no pair task; set "
                            f"data.pair_task: none (got {pair_task})")
        return ReplacedTokenDetection(config, multi_choice=objective.kind == "mc-bert")
    if objective.kind in ("unilm", "mass", "xlnet"):  # train/unilm.py, mass.py, xlnet.py
        if pair_task != "none":
            raise UserError(f"objective.kind {objective.kind} trains no pair task; set "
                            f"data.pair_task: none (got {pair_task})")
        if objective.kind == "xlnet":
            return XLNetLM(config)
        return UnifiedLM(config) if objective.kind == "unilm" else Seq2SeqLM(config)
    return MaskedLM(config) if pair_task == "none" else PreTrainingModel(config)


class TaskWeighting(nn.Module):
    """total = sum_i w_i * L_i (fixed), or with learned uncertainty
    total = sum_i exp(-s_i) * L_i + s_i / 2, s_i = log sigma_i^2 (Kendall et al. 2018, eq. 10
    for classification losses: 1/sigma^2 scales the loss, log sigma penalises a large sigma).
    s_i starts at 0 (weight 1).

    **Why it starves MLM, and what holds it.** Minimising over s_i alone gives
    exp(-s_i) = 1 / (2 L_i): at equilibrium each task's gradient is scaled by 1 / (2 L_i), so
    the ratio of two tasks' weights is the inverse ratio of their losses, whatever constant
    each loss is normalised by (dividing L_i by c_i multiplies exp(-s_i) by c_i: the same
    gradient). MLM over a 20k-token vocabulary sits at a loss of 4-6 nats, a two-way pair task
    at 0.3-0.6, so learned weights drift to about 1:10 against MLM (measured: 0.096 vs 1.09),
    and with Adam only that ratio matters. Two settings bound it:

    * ``weight_bounds = (lo, hi)``: every effective weight stays in [lo, hi] (s is clamped in
      the forward pass and projected back before each step, so it never wanders off beyond a
      bound and can follow the losses back); the ratio of any two weights is at most hi / lo.
    * ``weight_warmup``: the fraction of the run during which the weights stay at 1 (losses
      change fastest early on, and their equilibrium is meaningless then).
    The measured effect of each is in docs/pretrain.md ("Two tasks in one step")."""

    def __init__(self, tasks: list[str], spec: ObjectiveSpec):
        super().__init__()
        self.tasks = list(tasks)
        self.learned = spec.weighting == "uncertainty" and len(tasks) > 1
        self.fixed = {t: float(spec.weights.get(t, 1.0)) for t in tasks}
        # One learned log-variance per task; a lone task needs none (its weight only rescales
        # the learning rate).
        self.log_vars = nn.Parameter(torch.zeros(len(tasks))) if self.learned else None
        bounds = spec.weight_bounds
        if bounds is not None and not (len(bounds) == 2 and 0 < bounds[0] <= 1 <= bounds[1]):
            raise UserError(f"objective.weight_bounds must be [lo, hi] with 0 < lo <= 1 <= hi, "
                            f"got {list(bounds)}")
        # Weight w = exp(-s), so w in [lo, hi] is s in [-log hi, -log lo].
        self.s_range = None if bounds is None else (-math.log(bounds[1]), -math.log(bounds[0]))
        if not 0.0 <= spec.weight_warmup < 1.0:
            raise UserError(f"objective.weight_warmup must be in [0, 1), got "
                            f"{spec.weight_warmup}")
        self.warmup = spec.weight_warmup
        self.learning = self.warmup == 0.0

    def set_progress(self, fraction: float) -> None:
        """Before each step: start learning after the warm-up, keep s inside its bounds."""
        self.learning = fraction >= self.warmup
        if self.log_vars is not None and self.s_range is not None:
            with torch.no_grad():
                self.log_vars.clamp_(*self.s_range)

    def _log_vars(self) -> Tensor:
        s = self.log_vars
        if self.s_range is not None:
            s = s.clamp(*self.s_range)
        # During the warm-up s stays at 0; multiplying by 0 (not detaching) keeps a zero
        # gradient on it, so DDP still sees every parameter used.
        return s if self.learning else s * 0.0

    def forward(self, losses: dict[str, Tensor], regulariser_scale: float) -> Tensor:
        """Weighted sum of `losses` (already scaled to their share of the step) plus the
        uncertainty regulariser times `regulariser_scale` (1 / micro-steps, so a step adds it
        once)."""
        total = torch.zeros((), device=next(iter(losses.values())).device)
        log_vars = self._log_vars() if self.log_vars is not None else None
        for i, task in enumerate(self.tasks):
            if task not in losses:
                continue
            if log_vars is None:
                total = total + self.fixed[task] * losses[task]
            else:
                s = log_vars[i]
                total = total + torch.exp(-s) * losses[task] + 0.5 * s * regulariser_scale
        return total

    def weights(self) -> dict[str, float]:
        """The effective weight of every task (logged each step)."""
        if self.log_vars is None:
            return dict(self.fixed)
        with torch.no_grad():
            s = self._log_vars()
        return {t: math.exp(-float(v)) for t, v in zip(self.tasks, s.detach())}


class Pretrainer(Objective):
    """The pretraining objective: model + task weighting. `forward(batch, tokens_per_rank,
    micro_steps)` returns (total loss for backward, statistics for logging): see the module
    docstring. `evalset` is the common held-out evaluation (`evaluate`)."""

    def __init__(self, model: nn.Module, weighting: TaskWeighting,
                 evalset: list[dict[str, Tensor]] | None = None,
                 pair_evalset: list[dict[str, Tensor]] | None = None):
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.evalset = evalset or []
        self.pair_evalset = pair_evalset or []

    def units(self, batch: dict[str, Tensor]) -> float:
        return float(predicted_tokens(batch))

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        values = {}
        for task in ("mlm", "pair", "lm"):
            count = sums.get(f"{task}_tokens", sums.get(f"{task}_rows", 0.0))
            if count:
                values[f"loss_{task}"] = sums[f"{task}_loss_sum"] / count
                values[f"acc_{task}"] = sums[f"{task}_correct"] / count
        return values

    def log_extra(self) -> dict[str, float]:
        return {f"weight_{task}": w for task, w in self.weighting.weights().items()}

    def before_step(self, fraction: float) -> None:
        self.weighting.set_progress(fraction)

    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if not self.evalset:
            return None
        result = evaluate_lm(self.model, self.evalset, info, autocast)
        if self.pair_evalset and isinstance(self.model, PreTrainingModel):
            result.update(evaluate_pairs(self.model, self.pair_evalset, info, autocast))
        return result

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(self.model, CausalLM):
            return self._causal(batch, tokens_per_rank, micro_steps)
        pair_labels, pair_weights = batch.get("pair_labels"), batch.get("pair_weights")
        out = self.model(**{k: v for k, v in batch.items()
                            if k not in ("pair_labels", "pair_weights")})
        losses, stats = mlm_pair_losses(out.logits, out.pair_logits, labels=batch["mlm_labels"],
                                        pair_labels=pair_labels, pair_weights=pair_weights,
                                        tokens_per_rank=tokens_per_rank,
                                        micro_steps=micro_steps)
        return self.weighting(losses, 1.0 / micro_steps), stats

    def _causal(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(**causal_inputs(batch))
        # (B * (L-1),), -100 at padding and at each document's first token (next_token_labels)
        labels = batch["labels"][:, 1:].reshape(-1)
        logits = out.logits[:, :-1].float().flatten(0, 1)
        token_loss = nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                 reduction="sum")
        valid = labels != -100
        stats = {"lm_loss_sum": token_loss.detach(), "lm_tokens": valid.sum().float(),
                 "lm_correct": ((logits.detach().argmax(-1) == labels) & valid).sum().float()}
        return self.weighting({"lm": token_loss / tokens_per_rank}, 1.0 / micro_steps), stats


def mlm_pair_losses(logits: Tensor, pair_logits: Tensor | None, labels: Tensor,
                    pair_labels: Tensor | None, pair_weights: Tensor | None,
                    tokens_per_rank: float, micro_steps: int
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(losses, statistics) of MLM and the pair task from the masked tokens' logits (N, vocab)
    and the pair logits (B, 2) or None: the MLM loss is the token loss sum over the step's
    masked tokens per rank (module docstring); the pair loss is the weighted mean over this
    micro-batch's pair rows (corpus rows carry -100), one micro-batch's share of the step
    (every micro-batch has the same number of pair rows, the loader's pair_fraction, so the
    shares are equal). Also used by the objectives that read more of the encoder's output
    (`motian.train.mlm_rows`)."""
    token_loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    losses = {"mlm": token_loss / tokens_per_rank}
    stats = {"mlm_loss_sum": token_loss.detach(), "mlm_tokens": labels.new_tensor(
        labels.numel(), dtype=torch.float32),
        "mlm_correct": (logits.detach().argmax(-1) == labels).sum().float()}
    if pair_logits is not None and pair_labels is not None:
        loss_sum, weight_sum = pair_loss_sum(pair_logits, pair_labels, pair_weights)
        losses["pair"] = loss_sum / weight_sum.clamp(min=1e-12) / micro_steps
        keep = pair_labels != -100
        stats["pair_loss_sum"] = nn.functional.cross_entropy(
            pair_logits.detach().float()[keep], pair_labels[keep], reduction="sum")
        stats["pair_rows"] = keep.sum().float()
        stats["pair_correct"] = (pair_logits.detach().argmax(-1)[keep]
                                 == pair_labels[keep]).sum().float()
    return losses, stats


def token_summary(sums: dict[str, float], task: str) -> dict[str, float]:
    """`loss`, `loss_<task>` and `acc_<task>` of a window from the `<task>_loss_sum`,
    `<task>_tokens` and `<task>_correct` statistics (a token-level objective's `summarise`)."""
    n = sums.get(f"{task}_tokens", 0.0)
    if not n:
        return {}
    loss = sums[f"{task}_loss_sum"] / n
    return {"loss": loss, f"loss_{task}": loss, f"acc_{task}": sums[f"{task}_correct"] / n}


@torch.no_grad()
def held_out_sums(model: nn.Module, batches: list[dict], info: DistInfo, size: int,
                  add: Callable[[dict[str, Tensor]], list[float]]) -> Tensor:
    """The held-out loop every objective's evaluation shares: `model` in eval mode, each rank
    taking every world_size-th batch (moved to the rank's device), `add(batch)` giving that
    batch's `size` sums, which are added up in float64 and all-reduced, so every rank gets the
    same totals. The model's training mode is restored."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(size, dtype=torch.float64)
    try:
        for batch in batches[info.rank::info.world_size]:
            batch = {k: v.to(info.device) for k, v in batch.items()}
            sums += torch.tensor(add(batch), dtype=torch.float64)
    finally:
        model.train(was_training)
    all_reduce_sum(sums, info)
    return sums


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: list[dict], info: DistInfo,
                autocast) -> dict[str, float]:
    """Held-out masked-token (or next-token) loss and accuracy, each rank taking every
    world_size-th batch; sums are all-reduced so every rank gets the same numbers."""
    def add(batch: dict[str, Tensor]) -> list[float]:  # loss sum, correct, tokens
        with autocast:
            if "labels" in batch:  # causal
                logits = model(**causal_inputs(batch)).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                logits, labels = logits.flatten(0, 1), labels.reshape(-1)
                keep = labels != -100
                logits, labels = logits[keep], labels[keep]
            else:
                logits = model(**{k: v for k, v in batch.items() if k != "mlm_labels"}).logits
                labels = batch["mlm_labels"]
        logits = logits.float()
        return [float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                float((logits.argmax(-1) == labels).sum()), labels.numel()]

    sums = held_out_sums(model, batches, info, 3, add)
    n = max(float(sums[2]), 1.0)
    result = {"loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n,
              "tokens": int(sums[2])}
    if batches and "labels" in batches[0]:  # next-token: perplexity = exp(mean loss per token)
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def causal_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a CausalLM reads of a `causal_batches` batch: tokens, padding and, when present,
    document ids and restarting positions (document-aware packing)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "document_ids")
            if k in batch}


@torch.no_grad()
def evaluate_pairs(model: PreTrainingModel, batches: list[dict], info: DistInfo,
                   autocast) -> dict[str, float]:
    """Held-out pair-task loss and accuracy (unweighted: every held-out pair counts once), and
    the accuracy of always answering the majority label, to read it against. The rows are
    read whole: the masked tokens are put back first, since the pair task is used (and
    fine-tuned) on unmasked text, and the evaluation's [MASK] tokens are a token a recipe
    with Motian masking (synonyms and random words) never trains on."""
    def add(batch: dict[str, Tensor]) -> list[float]:  # loss sum, correct, rows, positives
        labels = batch["pair_labels"]
        whole = batch["input_ids"].clone()
        whole.view(-1)[batch["mlm_positions"]] = batch["mlm_labels"]
        with autocast:
            logits = model(**{k: v for k, v in batch.items() if k not in (
                "mlm_labels", "pair_labels", "pair_weights", "input_ids")},
                input_ids=whole).pair_logits.float()
        return [float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                float((logits.argmax(-1) == labels).sum()), labels.numel(),
                float(labels.sum())]

    sums = held_out_sums(model, batches, info, 4, add)
    n = max(float(sums[2]), 1.0)
    positive = float(sums[3]) / n
    return {"pair_loss": float(sums[0]) / n, "pair_accuracy": float(sums[1]) / n,
            "pair_majority": max(positive, 1 - positive), "pair_rows": int(sums[2])}


def predicted_tokens(batch: dict[str, Tensor]) -> int:
    """How many tokens of `batch` carry a loss (masked tokens, or next-token targets)."""
    if "mlm_labels" in batch:
        return int(batch["mlm_labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def init_weights_from(model: nn.Module, source: Path, verbose: bool = True) -> LoadReport:
    """Start from the weights in `source` (a motian model/checkpoint directory, or a Hugging
    Face BERT directory): copy every tensor whose name and shape match, and print what was
    loaded and what keeps its fresh initialisation, so continued pretraining never silently
    starts from random weights."""
    from motian.model.artifact import is_hf_bert
    from motian.model.io import FORMAT, load_weights, read_state_dict

    source = Path(source)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise UserError(f"--init-from {source}: no config.json; give a motian checkpoint or "
                        "model directory, or a Hugging Face BERT directory")
    meta = json.loads(config_path.read_text(encoding="utf-8"))
    if meta.get("format") == FORMAT:
        state = read_state_dict(source / "model.safetensors")
        unused: list[str] = []
    elif is_hf_bert(source):
        from motian.model.hf import bert_to_motian, read_hf_weights

        state, unused = bert_to_motian(read_hf_weights(source), type(model).__name__,
                                       model.config.layers)
    else:
        raise UserError(f"{config_path}: neither a motian model nor a BERT config")
    report = load_weights(model, state, str(source), strict=False, quiet=True)
    report.unexpected = sorted(set(report.unexpected) | set(unused))
    loaded = len(model.state_dict()) - len(report.missing) - len(report.mismatched)
    if loaded == 0:
        raise UserError(f"--init-from {source}: not one tensor of it fits this model (names or "
                        "shapes all differ), so the run would start from random weights; give "
                        "a checkpoint of the same family, or drop --init-from")
    if verbose:
        print(f"motian: --init-from {source}: loaded {loaded} of {len(model.state_dict())} "
              "tensors", file=sys.stderr)
        for label, keys in (("newly initialised (not in the source)", report.missing),
                            ("newly initialised (shape differs)", report.mismatched),
                            ("in the source but unused", report.unexpected)):
            if keys:
                print(f"  {label}: {len(keys)}: {', '.join(keys)}", file=sys.stderr)
    return report
