"""Training on a task's examples with the one loop: the fine-tuning objective, the batches of
featurised examples, and the techniques from the fine-tuning literature. `motian finetune` and
`motian distill` both train through `train_on_features`.

What differs between task types is confined to the task layer (`motian.tasks.heads`: which
head, how a batch's loss is read, how outputs become predictions); what differs from
pretraining is the objective here (`TaskObjective`) and the batch source (`FeatureBatches`):
stages, precision, accumulation, clipping, DDP, checkpoints and exact resume are `fit`'s.

Techniques, each off by default:
* layer-wise learning-rate decay (discriminative rates; ULMFiT, Howard & Ruder 2018; used by
  ELECTRA): the head keeps lr, block l of L (1-based) gets lr * decay^(L + 1 - l) and the
  embeddings lr * decay^(L + 1), over the groups of `layer_groups`.
* gradual unfreezing (ULMFiT): the head trains alone first; one layer group more becomes
  trainable, top-down, at evenly spaced points of the first `unfreeze` fraction of training.
  A frozen group's gradients are dropped before the optimizer step (so it is neither updated
  nor decayed), which keeps every parameter in DDP's reduction.
* an auxiliary masked-LM loss on the task's own inputs (Chronopoulou et al. 2019, "An
  embarrassingly simple approach for transfer learning from pretrained language models"),
  weighted by `aux_mlm`, through an MLM head initialised from the checkpoint's when it has one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.model.heads import MLMHead
from motian.tasks.features import Feature, collate
from motian.tasks.heads import batch_loss
from motian.train.checkpoint import (
    CHECKPOINTS,
    CorruptCheckpoint,
    checkpoint_dirs,
    latest_checkpoint,
    read_checkpoint_state,
)
from motian.train.distributed import DistInfo
from motian.train.fit import BatchSource, FitConfig, Objective, fit
from motian.train.metrics import MetricsLogger
from motian.train.optim import param_groups
from motian.train.settings import OptimSettings, RunSettings, Stage


@dataclass(frozen=True)
class TaskTraining:
    """What changes a fine-tuned result besides the optimiser (all stored with every result)."""

    epochs: float = field(default=3.0, metadata={"help": "passes over the training data "
                                                          "(fractions allowed)"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step (the "
                                                           "global batch)"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming "
                                                         "up (then linear decay to 0)"})
    layer_lr_decay: float = field(default=1.0, metadata={
        "help": "layer-wise learning-rate decay factor; 1 = off (e.g. 0.8)"})
    unfreeze: float = field(default=0.0, metadata={
        "help": "gradual unfreezing over this fraction of training, top layer first; 0 = off"})
    aux_mlm: float = field(default=0.0, metadata={
        "help": "weight of an auxiliary masked-LM loss on the task inputs; 0 = off"})
    mask_rate: float = field(default=0.15, metadata={
        "help": "of real tokens, for the auxiliary MLM loss"})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(n_examples: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(epochs * math.ceil(n_examples / batch_size)))


# --------------------------------------------------------------------------- layers and groups


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The model's modules bottom-up: [embeddings (+ relative-position tables)], one entry per
    block, [final norm + task head]. Layer-wise decay and unfreezing both walk this list."""
    backbone = model.backbone
    bottom = [m for name, m in backbone.named_children() if name not in ("blocks", "final_norm")]
    top = [m for name, m in model.named_children() if name != "backbone"]
    if backbone.final_norm is not None:
        top.append(backbone.final_norm)
    return [bottom] + [[block] for block in backbone.blocks] + [top]


def optimizer_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float,
                     extra: nn.Module | None = None) -> list[dict]:
    """`param_groups` (decay / no decay) per layer group, each with `lr_scale` =
    layer_lr_decay ** (distance from the top group), which `set_lr` applies."""
    groups = layer_groups(model)
    top = len(groups) - 1
    out = []
    for depth, modules in enumerate(groups):
        holder = nn.ModuleList(modules)
        for g in param_groups(holder, weight_decay) if list(holder.parameters()) else []:
            out.append({**g, "lr_scale": layer_lr_decay ** (top - depth)})
    if extra is not None:  # the auxiliary MLM head (and distillation's projections): full rate
        out += [{**g, "lr_scale": 1.0} for g in param_groups(extra, weight_decay)]
    seen: set[int] = set()
    for g in out:  # a weight shared between groups (tied) must be optimised once
        g["params"] = [p for p in g["params"] if id(p) not in seen and not seen.add(id(p))]
    return [g for g in out if g["params"]]


def trainable_groups(n_groups: int, progress: float, unfreeze: float) -> int:
    """How many layer groups (counted from the top) train at `progress`: group k from the top
    opens at progress k / (n - 1) * unfreeze; all of them when unfreezing is off."""
    if unfreeze <= 0:
        return n_groups
    return min(n_groups, 1 + int(progress / unfreeze * (n_groups - 1) + 1e-9))


def frozen_parameters(model: nn.Module, progress: float, unfreeze: float) -> list[nn.Parameter]:
    """The parameters gradual unfreezing keeps frozen at `progress`."""
    groups = layer_groups(model)
    open_from = len(groups) - trainable_groups(len(groups), progress, unfreeze)
    return [p for modules in groups[:open_from] for m in modules for p in m.parameters()]


# --------------------------------------------------------------------------- auxiliary MLM


def mask_for_mlm(input_ids: Tensor, attention_mask: Tensor, special: dict[str, int],
                 vocab_size: int, rate: float, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """BERT's 80/10/10 masking of `rate` of the real (non-special) tokens of (N, L) inputs.
    Returns (masked ids, flat positions (M,), original ids (M,)). Without a generator the
    global one is used, which the loop reseeds before every micro-batch."""
    specials = torch.tensor([special["cls"], special["sep"], special["pad"]])
    real = (attention_mask > 0) & ~torch.isin(input_ids, specials)
    chosen = real & (torch.rand(input_ids.shape, generator=generator) < rate)
    positions = chosen.reshape(-1).nonzero().squeeze(1)
    labels = input_ids.reshape(-1)[positions]
    ids = input_ids.clone().reshape(-1)
    roll = torch.rand(len(positions), generator=generator)
    ids[positions[roll < 0.8]] = special["mask"]
    swap = positions[(roll >= 0.8) & (roll < 0.9)]
    ids[swap] = torch.randint(vocab_size, (len(swap),), generator=generator)
    return ids.view_as(input_ids), positions, labels


def aux_mlm_loss(model: nn.Module, mlm: MLMHead, batch: dict[str, Tensor],
                 special: dict[str, int], rate: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """Masked-LM loss on a freshly masked copy of the batch's inputs (a second forward pass:
    the task loss keeps seeing clean inputs)."""
    L = batch["input_ids"].shape[-1]
    ids, mask = batch["input_ids"].reshape(-1, L), batch["attention_mask"].reshape(-1, L)
    types = batch["token_type_ids"].reshape(-1, L)
    masked, positions, labels = mask_for_mlm(ids.cpu(), mask.cpu(), special,
                                             model.config.vocab_size, rate, generator)
    if len(positions) == 0:
        return torch.zeros((), device=ids.device)
    h = model.encode(masked.to(ids.device), mask, types)  # (N, L, hidden)
    h = h.reshape(-1, h.shape[-1])[positions.to(ids.device)]
    logits = mlm(h, model.backbone.embeddings.word.weight)  # (M, vocab)
    return F.cross_entropy(logits.float(), labels.to(ids.device))


# --------------------------------------------------------------------------- the objective


def task_units(task_type: str, batch: dict[str, Tensor]) -> float:
    """What a task head's loss averages over: tagged tokens for token tasks, target tokens
    for generation, else rows."""
    if task_type in ("token", "generation") and "labels" in batch:
        return float((batch["labels"] != -100).sum())
    return float(batch["input_ids"].shape[0])


class TaskObjective(Objective):
    """A task head's own loss (plus the auxiliary MLM loss when weighted), with layer-wise
    rates and gradual unfreezing."""

    def __init__(self, model: nn.Module, task_type: str, settings: TaskTraining,
                 special: dict[str, int], mlm: MLMHead | None = None,
                 prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None):
        """`prepare`: what a batch becomes before the head reads it (a UNILM or MASS model's
        own generation rows: motian.task_generation.generation_rows); units are counted on
        the batch as collated."""
        super().__init__()
        self.prepare = prepare
        self.model, self.task_type, self.settings, self.special = model, task_type, settings, \
            special
        self.mlm = mlm if settings.aux_mlm else None
        self._frozen: list[nn.Parameter] = []

    def units(self, batch: dict[str, Tensor]) -> float:
        return task_units(self.task_type, batch)

    def forward(self, batch: dict[str, Tensor], units_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        n = self.units(batch)
        loss, _ = batch_loss(self.task_type, self.model,
                             batch if self.prepare is None else self.prepare(batch))
        stats = {"loss_sum": loss.detach() * n, "units": torch.tensor(n)}
        total = loss * (n / units_per_rank)
        if self.mlm is not None:
            aux = aux_mlm_loss(self.model, self.mlm, batch, self.special,
                               self.settings.mask_rate)
            total = total + self.settings.aux_mlm * aux * (n / units_per_rank)
            stats["aux_mlm_sum"] = aux.detach() * n
        return total, stats

    def param_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self.model, weight_decay, self.settings.layer_lr_decay,
                                self.mlm)

    def before_step(self, fraction: float) -> None:
        self._frozen = frozen_parameters(self.model, fraction, self.settings.unfreeze)

    def after_backward(self) -> None:
        for p in self._frozen:
            p.grad = None


# --------------------------------------------------------------------------- the batches


class FeatureBatches:
    """The `BatchSource` of task training: featurised examples in a fresh shuffle every epoch
    (the epochs joined into one stream, so every global batch is full), each global batch
    split into micro-batches so that micro-batch k of rank r holds rows
    (k * world + r) * micro ... + micro: the rows (and the dropout seeds `fit` derives from
    them) do not depend on how many processes share the batch."""

    def __init__(self, features: list[Feature], task_type: str, pad_id: int, seed: int):
        self.features, self.task_type, self.pad_id, self.seed = features, task_type, pad_id, seed
        self.rows = 0  # rows of the stream taken by the global batches started so far

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(len(self.features), generator=gen).tolist()

    def start(self, stage: int, spec: Stage, micro: int, info: DistInfo,
              state: dict | None) -> Iterator[dict[str, Tensor]]:
        self.rows = int(state["rows"]) if state else 0
        return self._batches(spec.global_batch, micro, info)

    def _batches(self, global_batch: int, micro: int, info: DistInfo):
        n, accum = len(self.features), global_batch // (micro * info.world_size)
        epoch, order = -1, []
        while True:
            start, self.rows = self.rows, self.rows + global_batch
            rows = []
            for r in range(start, start + global_batch):
                if r // n != epoch:
                    epoch, order = r // n, self._order(r // n)
                rows.append(order[r % n])
            for k in range(accum):
                first = (k * info.world_size + info.rank) * micro
                yield collate(self.task_type, [self.features[i] for i in
                                               rows[first:first + micro]], self.pad_id)

    def state_dict(self) -> dict:
        return {"rows": self.rows}


# --------------------------------------------------------------------------- the run


def train_on_features(objective: Objective, features: list[Feature], task_type: str,
                      pad_id: int, settings: TaskTraining, optim: OptimSettings,
                      run: RunSettings, info: DistInfo, seed: int, run_dir: Path,
                      fingerprint: str, checkpoint_every: int, label: str,
                      max_length: int) -> dict:
    """Train `objective` on `features` for `settings.epochs` with the one loop. Checkpoints go
    to run_dir/checkpoints and an interrupted run continues from the latest one made with the
    same `fingerprint` (one made with other settings is discarded: a changed run starts over).
    One metrics.jsonl record per step. Returns fit's summary with "final_loss"."""
    steps = total_steps(len(features), settings.epochs, settings.batch_size)
    return train_on_batches(objective, FeatureBatches(features, task_type, pad_id, seed), steps,
                            settings, optim, run, info, seed, run_dir, fingerprint,
                            checkpoint_every, label, max_length)


def train_on_batches(objective: Objective, source: BatchSource, steps: int,
                     settings: TaskTraining, optim: OptimSettings, run: RunSettings,
                     info: DistInfo, seed: int, run_dir: Path, fingerprint: str,
                     checkpoint_every: int, label: str, max_length: int) -> dict:
    """`train_on_features` for any batch source (multi-task training draws its batches from
    several tasks): `steps` optimizer steps of `settings.batch_size` rows, the same
    checkpoints, resume and log."""
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is not None and _fingerprint(latest) not in (fingerprint, None):
        if info.is_main:
            print(f"motian: {run_dir}: checkpoints of other settings; starting this run over")
            import shutil

            shutil.rmtree(run_dir / CHECKPOINTS)
        _barrier(info)
        latest = None
    resume = bool(checkpoint_dirs(run_dir))
    if not resume and info.is_main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a new run logs afresh
    config = FitConfig(optim=optim, stages=(Stage(seq_len=max_length, global_batch=settings.batch_size,
                                     warmup=settings.warmup),),
                       steps=steps, schedule="warmup-decay", seed=seed,
                       checkpoint_every=checkpoint_every, keep_last=1, log_every=1,
                       label=label, log_kind="finetune", fingerprint=fingerprint)
    summary = fit(objective, source, config, run, run_dir, info, resume=resume,
                  open_logger=(lambda: MetricsLogger(run_dir)) if info.is_main else None)
    summary["final_loss"] = summary["last"].get("loss", math.nan)
    return summary


def _fingerprint(checkpoint: Path) -> str | None:
    """The settings fingerprint of a checkpoint; None when it does not read back (then `fit`
    falls back to an older one, or refuses)."""
    try:
        return read_checkpoint_state(checkpoint).get("fingerprint")
    except CorruptCheckpoint:
        return None


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        torch.distributed.barrier()
