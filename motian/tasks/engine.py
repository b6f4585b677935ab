"""The one fine-tuning loop every task type uses, its model and optimiser set-up, and prediction.

What differs between task types is confined to three small places: which head is built
(`build_head`), how a batch's loss is read (`batch_loss`: the heads compute it, except that
multiple choice masks padded candidates) and how outputs become predictions (`predict`). The
loop itself is built from the pretraining engine's pieces, so a fix there is a fix here:
`build_optimizer` over `param_groups` (AdamW or LAMB), `set_lr` / `lr_multiplier` (warm-up then
linear decay), `resolve_precision` / `autocast_context` (bf16 on a capable GPU, fp16 with a loss
scaler, fp32 on CPU), `optimizer_step` (unscale, clip, skip a non-finite step, zero grads) and
`MetricsLogger` (one JSONL record per step, TensorBoard when installed). What it does not take
from `motian.train.loop.fit` is the packed-shard data path, stages and checkpoints: fine-tuning
steps over a list of features and is short enough to rerun a seed instead of resuming it.

Techniques from the fine-tuning literature, each off by default:
* layer-wise learning-rate decay (discriminative rates; ULMFiT, Howard & Ruder 2018; used by
  ELECTRA): the head keeps lr, block l of L (1-based) gets lr * decay^(L + 1 - l) and the
  embeddings lr * decay^(L + 1), over the groups of `layer_groups`.
* gradual unfreezing (ULMFiT): the head trains alone first; one layer group more becomes
  trainable, top-down, at evenly spaced points of the first `unfreeze` fraction of training.
* an auxiliary masked-LM loss on the task's own inputs (Chronopoulou et al. 2019, "An
  embarrassingly simple approach for transfer learning from pretrained language models"),
  weighted by `aux_mlm`, through an MLM head initialised from the checkpoint's when it has one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.model.config import ModelConfig
from motian.model.heads import (
    MLMHead,
    MultipleChoice,
    SequenceClassification,
    SpanExtraction,
    TokenClassification,
)
from motian.tasks.features import Feature, best_span, collate, decode_tokens
from motian.tasks.types import Example, Task, tag_names
from motian.train.loop import autocast_context, optimizer_step, resolve_precision
from motian.train.metrics import MetricsLogger
from motian.train.optim import build_optimizer, param_groups
from motian.train.schedule import lr_multiplier, set_lr


@dataclass
class TrainSettings:
    """What changes the fine-tuned result (all stored with every result)."""

    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    layer_lr_decay: float = 1.0  # 1 = off
    unfreeze: float = 0.0  # fraction of training over which layers are unfrozen; 0 = off
    aux_mlm: float = 0.0  # weight of the auxiliary MLM loss; 0 = off
    mask_rate: float = 0.15  # of real tokens, for the auxiliary MLM loss
    optimizer: Literal["adamw", "lamb"] = "adamw"


def build_head(task: Task, config: ModelConfig) -> nn.Module:
    if task.type in ("single", "pair"):
        return SequenceClassification(config, num_labels=len(task.labels))
    if task.type == "token":
        return TokenClassification(config, num_labels=len(tag_names(task.labels, task.scheme)))
    if task.type == "span":
        return SpanExtraction(config)
    return MultipleChoice(config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def apply_unfreezing(model: nn.Module, progress: float, unfreeze: float) -> int:
    """Set requires_grad for gradual unfreezing at training `progress`; returns how many layer
    groups (counted from the top) are trainable."""
    groups = layer_groups(model)
    n = len(groups)
    if unfreeze <= 0:
        trainable = n
    else:  # group k from the top opens at progress k / (n - 1) * unfreeze
        trainable = min(n, 1 + int(progress / unfreeze * (n - 1) + 1e-9))
    for depth, modules in enumerate(groups):
        on = depth >= n - trainable
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(on)
    return trainable


# --------------------------------------------------------------------------- losses


def batch_loss(task_type: str, model: nn.Module, batch: dict[str, Tensor]):
    """(loss, output) of one batch. Choice masks padded candidates out of the softmax."""
    if task_type == "choice":
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "choice_mask")}
        out = model(**inputs)
        logits = out.logits.masked_fill(~batch["choice_mask"], -1e4)
        out.logits = logits
        loss = F.cross_entropy(logits.float(), batch["labels"]) if "labels" in batch else None
        return loss, out
    out = model(**batch)
    return out.loss, out


def mask_for_mlm(input_ids: Tensor, attention_mask: Tensor, special: dict[str, int],
                 vocab_size: int, rate: float, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """BERT's 80/10/10 masking of `rate` of the real (non-special) tokens of (N, L) inputs.
    Returns (masked ids, flat positions (M,), original ids (M,))."""
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
                 special: dict[str, int], rate: float, generator: torch.Generator) -> Tensor:
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


# --------------------------------------------------------------------------- the loop


def train(model: nn.Module, task_type: str, features: list[Feature], settings: TrainSettings,
          seed: int, pad_id: int, device: torch.device, special: dict[str, int],
          mlm: MLMHead | None = None, on_step: Callable[[int, int, float], None] | None = None,
          loss_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
          extra: nn.Module | None = None, precision: str = "fp32",
          log_dir: Path | None = None) -> dict[str, float]:
    """Fine-tune `model` in place; returns {"steps", "final_loss", "skipped_steps"}.

    `loss_fn(batch)` replaces the task loss (distillation: motian.distillation), `extra` holds more
    trainable modules (its projections), trained at the full rate. `precision` is resolved as
    in pretraining ("auto": bf16 on a GPU that has it, else fp32); with `log_dir`, every step
    appends {"loss", "lr", "grad_norm", "skipped"} to log_dir/metrics.jsonl."""
    s = settings
    total = max(1, math.ceil(s.epochs * math.ceil(len(features) / s.batch_size)))
    extras = nn.ModuleList([m for m in (mlm if s.aux_mlm else None, extra) if m is not None])
    groups = optimizer_groups(model, s.weight_decay, s.layer_lr_decay,
                              extras if len(extras) else None)
    optimizer = build_optimizer(model, s.optimizer, s.lr, s.weight_decay, eps=1e-6, groups=groups)
    trained = nn.ModuleList([model, extras])  # clipping sees every trained parameter
    precision = resolve_precision(precision, device)
    autocast = autocast_context(precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    logger = MetricsLogger(Path(log_dir)) if log_dir is not None else None
    batches = _shuffled_batches(task_type, features, s.batch_size, pad_id, seed, total)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    loss_value, skipped = math.nan, 0
    try:
        for step, batch in enumerate(batches):
            apply_unfreezing(model, step / total, s.unfreeze)
            lr = s.lr * lr_multiplier((step + 1) / total, s.warmup, "linear")
            set_lr(optimizer, lr)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = loss_fn(batch) if loss_fn else batch_loss(task_type, model, batch)[0]
                if s.aux_mlm and mlm is not None:
                    loss = loss + s.aux_mlm * aux_mlm_loss(model, mlm, batch, special,
                                                           s.mask_rate, mask_gen)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            norm, bad = optimizer_step(trained, optimizer, s.clip_norm, scaler)
            skipped += bad
            loss_value = loss.item()
            if logger is not None:
                logger.log("finetune", step + 1, {"loss": loss_value, "lr": lr,
                                                  "grad_norm": norm, "skipped": int(bad)})
            if on_step:
                on_step(step + 1, total, loss_value)
    finally:
        if logger is not None:
            logger.close()
    apply_unfreezing(model, 1.0, 0.0)
    return {"steps": total, "final_loss": loss_value, "skipped_steps": skipped}


def _shuffled_batches(task_type: str, features: list[Feature], batch_size: int, pad_id: int,
                      seed: int, total: int):
    """`total` collated batches; each epoch is a fresh shuffle from the run's own generator (a
    last short batch closes an epoch, as in the pretraining loader)."""
    order_gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(total):
        if not order:
            order = torch.randperm(len(features), generator=order_gen).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        yield collate(task_type, [features[i] for i in chunk], pad_id)


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(model: nn.Module, task: Task, features: list[Feature], examples: list[Example],
            pad_id: int, device: torch.device, batch_size: int = 64,
            precision: str = "fp32") -> list:
    """One prediction per example: class/choice index, character spans, or answer text
    (the best-scoring span over all of an example's windows; "" if none fits)."""
    model.eval()
    autocast = autocast_context(resolve_precision(precision, device), device)
    kind = task.type
    tags = tag_names(task.labels, task.scheme) if kind == "token" else []
    best: list = [None] * len(examples)
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(kind, chunk, pad_id).items()
                 if k not in ("labels", "start_positions", "end_positions")}
        with autocast:
            _, out = batch_loss(kind, model, batch)
        logits = out.logits.float().cpu()
        for j, f in enumerate(chunk):
            if kind in ("single", "pair", "choice"):
                best[f.example] = int(logits[j].argmax())
            elif kind == "token":
                ids = logits[j, :len(f.input_ids)].argmax(-1).tolist()
                best[f.example] = decode_tokens([tags[t] for t in ids], f.offsets)
            else:
                cand = best_span(logits[j], out.end_logits[j].float().cpu(), f.offsets)
                if cand and (best[f.example] is None or cand[0] > best[f.example][0]):
                    best[f.example] = cand
    if kind == "span":
        return [examples[k].text[b[1]:b[2]] if b else "" for k, b in enumerate(best)]
    return best
