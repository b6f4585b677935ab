"""FastBERT-style adaptive early exit (Liu et al. 2020, "FastBERT: a Self-distilling BERT with
Adaptive Inference Time", arXiv:2004.02178): a classifier after every encoder block, and a
sample leaves at the first block whose prediction is confident enough.

`EarlyExitClassification` is a `SequenceClassification` with one more `ClassifierHead` per block
below the last (`exits`, FastBERT's "students"); the last block keeps the fine-tuned head (the
"teacher"). The students are trained by `motian early-exit` (motian/early_exiting.py) with the
backbone and the teacher frozen, so the full-depth output never changes.

At inference a row leaves at block i when the normalised entropy of its prediction there,
H(p) / log(num_labels) in [0, 1], is below `exit_threshold` (FastBERT's "speed"). Rows that
left are dropped from the batch before the next block, so the blocks above run on fewer rows:
that is where the time is saved. `exit_threshold` 0 never exits (entropy is never below 0) and
runs exactly `SequenceClassification.forward`, so its outputs are the fine-tuned model's, bit
for bit. The threshold is saved in config.json (`head_kwargs`), so the saved directory loads
with `from_pretrained` like any head and serves with its threshold.

Intermediate states are read through the backbone's final LayerNorm (Pre-LN models leave the
residual stream unnormalised until the end; Post-LN blocks end in their own norm), so every
head sees states of the scale the teacher reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.heads import HEADS, ClassifierHead, ModelOutput, SequenceClassification
from motian.model.transformer import AttentionContext, MotianModel

# AttentionContext / SlidingPlan fields with one row per sequence (B first, or 1 = shared by
# all rows); tables shared by every row (nezha / deberta / sliding `table`) are not listed.
_PER_ROW = ("mask", "relative_index", "bias", "global_at", "global_out", "global_bias",
            "index", "global_index")


def normalised_entropy(logits: Tensor) -> Tensor:
    """(B, C) logits -> (B,) entropy of softmax(logits) / log C, in [0, 1]: 0 = certain,
    1 = uniform (FastBERT's uncertainty)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


def check_threshold(threshold: float, where: str = "exit_threshold") -> float:
    """A threshold in [0, 1] (normalised entropy); a UserError naming `where` otherwise."""
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or \
            not 0.0 <= float(threshold) <= 1.0:
        raise UserError(f"{where} {threshold!r}: an early-exit threshold is a normalised "
                        "entropy in [0, 1] (0 = never exit early, 1 = always leave at block 1); "
                        "e.g. 0.3")
    return float(threshold)


class _Stop(Exception):
    """Raised by the first block's pre-hook once the backbone has prepared its inputs."""


def prepare(backbone: MotianModel, input_ids: Tensor, attention_mask: Tensor | None,
            token_type_ids: Tensor | None, position_ids: Tensor | None
            ) -> tuple[Tensor, AttentionContext]:
    """The embeddings (B, L, hidden) and attention context the blocks read, built by the
    backbone's own forward and stopped at its first block: positions, masks and position
    biases come from the one place that makes them, never a copy."""
    got: list = []

    def grab(module, args):
        got.extend(args[:2])
        raise _Stop

    handle = backbone.blocks[0].register_forward_pre_hook(grab)
    try:
        backbone(input_ids, attention_mask, token_type_ids, position_ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0], got[1]


def keep_rows(ctx, keep: Tensor, B: int):
    """`ctx` (an AttentionContext, or its SlidingPlan) for the rows `keep` (B,) bool of a
    batch of B: per-row tensors are indexed, shared ones (first dim 1) kept as they are."""
    changes = {}
    for f in fields(ctx):
        value = getattr(ctx, f.name)
        if f.name in _PER_ROW and isinstance(value, Tensor) and value.shape[0] == B:
            changes[f.name] = value[keep]
        elif f.name == "rotary" and value is not None:
            changes[f.name] = tuple(t[keep] if t.shape[0] == B else t for t in value)
        elif is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = keep_rows(value, keep, B)
    return replace(ctx, **changes)


class EarlyExitClassification(SequenceClassification):
    """`SequenceClassification` plus a classifier after each block below the last; `forward`
    leaves each row at the first block whose normalised entropy is below `exit_threshold`.
    Outputs: `logits` (B, num_labels) of the head each row left at, `exit_layers` (B,) the
    blocks it ran (1-based); `hidden_states` is None (rows end at different depths)."""

    def __init__(self, config: ModelConfig, num_labels: int = 2, exit_threshold: float = 0.0):
        if num_labels < 2:
            raise UserError(f"early exit needs a classifier of 2 or more labels, not "
                            f"num_labels={num_labels} (a regression head has no entropy)")
        super().__init__(config, num_labels=num_labels)
        self.exit_threshold = check_threshold(exit_threshold)
        self.head_kwargs["exit_threshold"] = self.exit_threshold  # saved in config.json
        self.exits = nn.ModuleList(ClassifierHead(config, num_labels)
                                   for _ in range(config.layers - 1))
        self._init_head()

    def set_threshold(self, threshold: float) -> None:
        self.exit_threshold = self.head_kwargs["exit_threshold"] = check_threshold(threshold)

    def classifier(self, i: int) -> ClassifierHead:
        """The head read after block i (0-based): a student, or the teacher at the top."""
        return self.head if i == len(self.backbone.blocks) - 1 else self.exits[i]

    def _normed(self, x: Tensor) -> Tensor:
        norm = self.backbone.final_norm
        return x if norm is None else norm(x)

    def block_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                     token_type_ids: Tensor | None = None,
                     position_ids: Tensor | None = None) -> list[Tensor]:
        """Every block's output (B, L, hidden) as the heads read it, all rows at full depth
        (what the students are trained on)."""
        x, ctx = prepare(self.backbone, input_ids, attention_mask, token_type_ids, position_ids)
        states = []
        for block in self.backbone.blocks:
            x = block(x, ctx)
            states.append(self._normed(x))
        return states

    def exit_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    token_type_ids: Tensor | None = None) -> list[Tensor]:
        """Each block's classifier output (B, num_labels), all rows at full depth: the curve
        over thresholds is read off these without running the model once per threshold."""
        states = self.block_states(input_ids, attention_mask, token_type_ids)
        return [self.classifier(i)(h, attention_mask) for i, h in enumerate(states)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        n = len(self.backbone.blocks)
        if self.exit_threshold <= 0.0:  # never exits: the fine-tuned model's own forward
            out = super().forward(input_ids, attention_mask, token_type_ids, position_ids,
                                  labels)
            out.exit_layers = torch.full((input_ids.shape[0],), n, device=input_ids.device)
            return out
        x, ctx = prepare(self.backbone, input_ids, attention_mask, token_type_ids, position_ids)
        B = x.shape[0]
        alive = torch.arange(B, device=x.device)  # batch row of each row still running
        mask = attention_mask
        logits = exit_layers = None
        for i, block in enumerate(self.backbone.blocks):
            x = block(x, ctx)
            out = self.classifier(i)(self._normed(x), mask)  # (rows, num_labels)
            if logits is None:
                logits = out.new_zeros(B, self.num_labels)
                exit_layers = torch.full((B,), n, device=x.device)
            leave = (torch.ones_like(alive, dtype=torch.bool) if i == n - 1
                     else normalised_entropy(out) < self.exit_threshold)
            logits[alive[leave]] = out[leave]
            exit_layers[alive[leave]] = i + 1
            if bool(leave.all()):
                break
            if bool(leave.any()):  # the rest go on without the rows that left
                stay = ~leave
                ctx = keep_rows(ctx, stay, len(alive))
                x, alive = x[stay], alive[stay]
                mask = None if mask is None else mask[stay]
        result = ModelOutput(logits=logits, exit_layers=exit_layers)
        if labels is not None:
            result.loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return result

    def full_depth(self) -> SequenceClassification:
        """The fine-tuned model without its exits (sharing its weights): what a static graph
        (ONNX, Hugging Face) exports."""
        with torch.device("meta"):  # its own backbone and head are replaced at once
            model = SequenceClassification(self.config, self.num_labels)
        model.backbone, model.head = self.backbone, self.head
        model.vocab_hash = getattr(self, "vocab_hash", None)
        return model.eval() if not self.training else model


def saved_threshold(directory: str | Path) -> float | None:
    """The exit threshold an early-exit model directory saved; None for any other model."""
    try:
        meta = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("head") != EarlyExitClassification.__name__:
        return None
    return float((meta.get("head_kwargs") or {}).get("exit_threshold", 0.0))


HEADS[EarlyExitClassification.__name__] = EarlyExitClassification  # from_pretrained by name
