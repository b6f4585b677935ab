"""A task head for every task type, its loss on a batch and its predictions.

What differs between task types is confined to these three small places: which head is built
(`build_head`), how a batch's loss is read (`batch_loss`: the heads compute it, except that
multiple choice masks padded candidates) and how outputs become predictions (`predict`).
Training on a task is `motian.task_training` (the one loop, `motian.train.fit`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.elmo import elmo_task_head
from motian.model.heads import (
    HEADS,
    CausalLM,
    MultipleChoice,
    SequenceClassification,
    SpanExtraction,
    TokenClassification,
)
from motian.tasks.features import Feature, best_span, collate, decode_tokens
from motian.tasks.types import Example, Task, tag_names
from motian.train.fit import autocast_context, resolve_precision


def build_head(task: Task, config: ModelConfig, pretrained_head: str | None = None
               ) -> nn.Module:
    """The task model of `config`. A generation task keeps the generating family the model was
    pretrained as (`pretrained_head`: UNILM's UnifiedLM, MASS's Seq2SeqLM), else a CausalLM.
    An ELMo biLM (`ElmoLM`) is used feature-based: frozen, a scalar mix of its layers and a
    small task model (motian.model.elmo)."""
    if pretrained_head in ELMO_HEADS:
        return elmo_task_head(task.type, config, len(tag_names(task.labels, task.scheme))
                              if task.type == "token" else len(task.labels or ()))
    if task.type == "generation":
        if pretrained_head in SEQ2SEQ_GENERATORS:
            return HEADS[pretrained_head](config)
        if not config.causal:
            raise UserError(GENERATION_NEEDS_CAUSAL)
        return CausalLM(config)
    if task.type in ("single", "pair"):
        return SequenceClassification(config, num_labels=len(task.labels))
    if task.type == "token":
        return TokenClassification(config, num_labels=len(tag_names(task.labels, task.scheme)))
    if task.type == "span":
        return SpanExtraction(config)
    return MultipleChoice(config)


# The ELMo biLM and its task models (a fine-tuned one continues as itself).
ELMO_HEADS = ("ElmoLM", "ElmoTokenTagger", "ElmoSequenceClassifier")
# Generation-pretrained families fine-tuned on their own rows (motian.tasks.generation_rows).
SEQ2SEQ_GENERATORS = ("UnifiedLM", "Seq2SeqLM")
GENERATION_NEEDS_CAUSAL = (
    "a generation task needs a causal model: a bidirectional (masked-LM) encoder sees the "
    "token it must predict and cannot produce text left to right. Start from a causal LM "
    "(motian pretrain --recipe gpt-demo, then --model RUN/final)")


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


@torch.no_grad()
def predict(model: nn.Module, task: Task, features: list[Feature], examples: list[Example],
            pad_id: int, device: torch.device, batch_size: int = 64,
            precision: str = "fp32") -> list:
    """One prediction per example: class/choice index, character spans, or answer text
    (the best-scoring span over all of an example's windows; "" if none fits). Generation
    decodes token by token: `motian.task_generation.generate_predictions` (serving's layer)."""
    if task.type == "generation":
        raise ValueError("generation tasks are predicted by motian.task_generation")
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
