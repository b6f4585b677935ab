"""ELMo (Peters et al. 2018, arXiv:1802.05365): a bidirectional LSTM language model and its
feature-based use (recipe `motian/configs/elmo-demo.yaml`; docs/knowledge.md, "ELMo").

**The biLM** (`BiLM`, the `backbone` of every model here): token embeddings (motian's tokenizer
ids; the paper's character CNN is not reproduced) feed `config.layers` layers, each a forward
and a backward LSTM with `config.ffn` cells projected to `config.hidden` (the paper's LSTMP:
4096 cells, 512 projection), a residual connection between layers as in the paper. The
backward LSTM reads each row reversed within its real tokens (right padding never enters it).
The forward LSTM's output at t has seen tokens <= t only, the backward one's tokens >= t only.

**The LM** (`ElmoLM`, what pretraining trains and final/ holds): one softmax shared by both
directions (the paper ties the token representation and the softmax between directions; here
the softmax is also tied to the input embedding when `tie_word_embeddings`). The forward LM at
t predicts token t + 1, the backward LM at t predicts token t - 1 (`bilm_targets`).

**Feature-based use** (`ElmoTokenTagger`, `ElmoSequenceClassifier`): the biLM frozen, a learned
`ScalarMix` (softmax-normalised weights s_j and a scale gamma) over its layers (the token layer
duplicated to both directions' width, then each LSTM layer's concatenated directions), and a
small task model on top: a linear tagger per token, or mean pooling + linear. Only the mix and
the task model train (`motian finetune --model ELMO_RUN/final`; motian.tasks.heads.build_head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.heads import HEADS, ModelOutput, masked_mean


def reverse_rows(x: Tensor, attention_mask: Tensor) -> Tensor:
    """`x` (B, L, ...) with each row's real tokens (the first mask.sum() positions) in reverse
    order and its padding left where it is. Its own inverse."""
    B, L = attention_mask.shape
    lengths = attention_mask.long().sum(1, keepdim=True)  # (B, 1)
    idx = torch.arange(L, device=x.device).expand(B, L)
    rev = torch.where(idx < lengths, lengths - 1 - idx, idx)
    if x.dim() == 3:
        rev = rev.unsqueeze(-1).expand_as(x)
    return x.gather(1, rev)


class TokenEmbedding(nn.Module):
    """The token layer (`word`, as the Transformer backbone names its table)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden)
        nn.init.normal_(self.word.weight, std=config.initializer_range)


class BiLMLayer(nn.Module):
    """One layer: a forward and a backward LSTM (LSTMP when cells > hidden)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.ffn < config.hidden:
            raise UserError(f"ELMo: model.ffn (LSTM cells per direction, {config.ffn}) must be "
                            f">= model.hidden (the projection and embedding size, "
                            f"{config.hidden})")
        proj = config.hidden if config.ffn > config.hidden else 0
        self.forward_lstm = nn.LSTM(config.hidden, config.ffn, batch_first=True, proj_size=proj)
        self.backward_lstm = nn.LSTM(config.hidden, config.ffn, batch_first=True,
                                     proj_size=proj)


class BiLM(nn.Module):
    """The bidirectional LSTM LM's body (module docstring). `forward` returns the forward and
    backward outputs of every layer, each (B, L, hidden), position-aligned with the input."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = TokenEmbedding(config)
        self.blocks = nn.ModuleList(BiLMLayer(config) for _ in range(config.layers))
        self.final_norm = None  # what motian.task_training.layer_groups looks for
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(token embeddings, forward outputs per layer, backward outputs per layer)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        e = self.embeddings.word(input_ids)
        fwd, bwd = self.dropout(e), reverse_rows(self.dropout(e), attention_mask)
        fwd_out, bwd_out = [], []
        for i, block in enumerate(self.blocks):
            f, _ = block.forward_lstm(fwd)
            b, _ = block.backward_lstm(bwd)
            if i > 0:  # the residual connection between layers
                f, b = f + fwd, b + bwd
            fwd_out.append(f)
            bwd_out.append(reverse_rows(b, attention_mask))
            fwd, bwd = self.dropout(f), self.dropout(b)
        return e, fwd_out, bwd_out

    def layer_features(self, input_ids: Tensor, attention_mask: Tensor | None = None
                       ) -> list[Tensor]:
        """ELMo's layers (B, L, 2 * hidden): the token layer [e; e], then each LSTM layer's
        [forward; backward]."""
        e, fwd, bwd = self(input_ids, attention_mask)
        return [torch.cat([e, e], -1)] + [torch.cat([f, b], -1) for f, b in zip(fwd, bwd)]


def bilm_targets(input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(forward, backward) targets (B, L), -100 where nothing is predicted, from a causal
    batch's `labels` (motian.data.splits.next_token_labels: -100 at padding and at the first
    token of every document after the first in a row). The forward LM at t predicts token
    t + 1, the backward LM at t token t - 1; neither predicts across a document boundary."""
    fwd, bwd = torch.full_like(labels, -100), torch.full_like(labels, -100)
    fwd[:, :-1] = labels[:, 1:]
    bwd[:, 1:] = torch.where(labels[:, 1:] != -100, input_ids[:, :-1], -100)
    return fwd, bwd


class ElmoLM(nn.Module):
    """The biLM with its softmax shared by both directions (module docstring). `forward`
    returns ModelOutput with `losses` {"forward", "backward"}: each direction's summed token
    loss, when `labels` are given (a causal batch's), and `hidden_states` the top layer's
    [forward; backward]; `logits` are computed only when asked (`return_logits`: the forward
    LM's (B, L, vocab)), since (B, L, vocab) twice is most of the memory."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = BiLM(config)
        self.decoder = None if config.tie_word_embeddings else nn.Linear(
            config.hidden, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def lm_logits(self, h: Tensor) -> Tensor:
        weight = self.backbone.embeddings.word.weight if self.decoder is None else \
            self.decoder.weight
        return F.linear(h, weight, self.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, return_logits: bool = False,
                **_: Tensor) -> ModelOutput:
        _, fwd, bwd = self.backbone(input_ids, attention_mask)
        out = ModelOutput(hidden_states=torch.cat([fwd[-1], bwd[-1]], -1))
        if return_logits:
            out.logits = self.lm_logits(fwd[-1])
        if labels is not None:
            for name, h, target in zip(("forward", "backward"), (fwd[-1], bwd[-1]),
                                       bilm_targets(input_ids, labels)):
                keep = target != -100
                logits = self.lm_logits(h[keep]).float()
                out.losses[name] = F.cross_entropy(logits, target[keep], reduction="sum")
                out.losses[f"{name}_correct"] = (logits.detach().argmax(-1)
                                                 == target[keep]).sum().float()
            out.loss = out.losses["forward"] + out.losses["backward"]
        return out


class ScalarMix(nn.Module):
    """ELMo's task weighting of the layers: gamma * sum_j softmax(s)_j * h_j (eq. 1)."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.scalars = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: list[Tensor]) -> Tensor:
        w = torch.softmax(self.scalars, 0)
        return self.gamma * sum(w[j] * h for j, h in enumerate(layers))


class _FrozenBiLM(nn.Module):
    """A frozen biLM (`backbone`, loaded from the ELMo run), a scalar mix over its layers and a
    linear classifier of the mixed features; subclasses say what it classifies (`forward`)."""

    def __init__(self, config: ModelConfig, num_labels: int = 2):
        super().__init__()
        self.config, self.head_kwargs = config, {"num_labels": num_labels}
        self.backbone = BiLM(config)
        self.backbone.requires_grad_(False)
        self.mix = ScalarMix(config.layers + 1)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(2 * config.hidden, num_labels)

    def train(self, mode: bool = True) -> _FrozenBiLM:
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout stays off too
        return self

    def features(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        with torch.no_grad():
            layers = self.backbone.layer_features(input_ids, attention_mask)
        return self.dropout(self.mix(layers))


class ElmoTokenTagger(_FrozenBiLM):
    """Token tagging from ELMo features: a linear layer per token (-100 labels ignored)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **_: Tensor) -> ModelOutput:
        logits = self.classifier(self.features(input_ids, attention_mask))
        loss = None if labels is None else F.cross_entropy(
            logits.float().flatten(0, 1), labels.reshape(-1), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits)


class ElmoSequenceClassifier(_FrozenBiLM):
    """Single-text classification from ELMo features: mean over real tokens, then linear."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **_: Tensor) -> ModelOutput:
        pooled = masked_mean(self.features(input_ids, attention_mask), attention_mask)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ModelOutput(loss=loss, logits=logits)


def elmo_task_head(task_type: str, config: ModelConfig, num_labels: int) -> nn.Module:
    """The feature-based task model for an ELMo biLM, or a UserError naming the task type."""
    if task_type == "token":
        return ElmoTokenTagger(config, num_labels)
    if task_type == "single":
        return ElmoSequenceClassifier(config, num_labels)
    raise UserError(f"task type {task_type!r}: an ELMo model (head ElmoLM) is used "
                    "feature-based for token tagging (type token) and single-text "
                    "classification (type single) only; use a Transformer model for pair, "
                    "span, choice and generation tasks")


for _cls in (ElmoLM, ElmoTokenTagger, ElmoSequenceClassifier):
    HEADS[_cls.__name__] = _cls  # from_pretrained rebuilds them by name
