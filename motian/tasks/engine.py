"""The one fine-tuning loop every task type uses, its model and optimiser set-up, and prediction.

What differs between task types is confined to three small places: which head is built
(`build_head`), how a batch's loss is read (`batch_loss`: the heads compute it, except that
multiple choice masks padded candidates) and how outputs become predictions (`predict`). The
loop itself is the pretraining engine's pieces: `param_groups` / `set_lr` / `lr_multiplier` from
`motian.train`, and `optimizer_step` (clip, skip a non-finite step, zero grads) from its loop.

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
from motian.train.loop import optimizer_step
from motian.train.optim import param_groups
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
          extra: nn.Module | None = None) -> dict[str, float]:
    """Fine-tune `model` in place; returns {"steps", "final_loss"}. `loss_fn(batch)` replaces
    the task loss (distillation: motian.distill), `extra` holds more trainable modules (its
    projections), trained at the full rate."""
    s = settings
    steps_per_epoch = math.ceil(len(features) / s.batch_size)
    total = max(1, math.ceil(s.epochs * steps_per_epoch))
    extras = [m for m in (mlm if s.aux_mlm else None, extra) if m is not None]
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, s.weight_decay, s.layer_lr_decay,
                         nn.ModuleList(extras) if extras else None),
        lr=s.lr, eps=1e-6, weight_decay=s.weight_decay)
    order_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    order: list[int] = []
    loss_value = math.nan
    for step in range(total):
        if not order:  # a new epoch: a fresh shuffle from the run's own generator
            order = torch.randperm(len(features), generator=order_gen).tolist()
        chunk, order = order[:s.batch_size], order[s.batch_size:]
        apply_unfreezing(model, step / total, s.unfreeze)
        set_lr(optimizer, s.lr * lr_multiplier((step + 1) / total, s.warmup, "linear"))
        batch = {k: v.to(device) for k, v in
                 collate(task_type, [features[i] for i in chunk], pad_id).items()}
        loss = loss_fn(batch) if loss_fn else batch_loss(task_type, model, batch)[0]
        if s.aux_mlm and mlm is not None:
            loss = loss + s.aux_mlm * aux_mlm_loss(model, mlm, batch, special, s.mask_rate,
                                                   mask_gen)
        loss.backward()
        loss = loss.detach()
        optimizer_step(model, optimizer, s.clip_norm)
        loss_value = loss.item()
        if on_step:
            on_step(step + 1, total, loss_value)
    apply_unfreezing(model, 1.0, 0.0)
    return {"steps": total, "final_loss": loss_value}


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(model: nn.Module, task: Task, features: list[Feature], examples: list[Example],
            pad_id: int, device: torch.device, batch_size: int = 64) -> list:
    """One prediction per example: class/choice index, character spans, or answer text
    (the best-scoring span over all of an example's windows; "" if none fits)."""
    model.eval()
    kind = task.type
    tags = tag_names(task.labels, task.scheme) if kind == "token" else []
    best: list = [None] * len(examples)
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(kind, chunk, pad_id).items()
                 if k not in ("labels", "start_positions", "end_positions")}
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
