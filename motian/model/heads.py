"""Task heads on the motian backbone, each a complete model whose `forward` returns the loss when
labels are given: `MaskedLM`, `PreTrainingModel` (MLM + pair task, per-task losses),
`SequenceClassification`, `TokenClassification`, `SpanExtraction`, `MultipleChoice`, `CausalLM`,
`ReplacedTokenDetection` (ELECTRA / MC-BERT discriminator).

Inputs follow the batch contract of docs/model.md (`input_ids`, `attention_mask`,
`token_type_ids`, `position_ids`, `document_ids`, compact `mlm_positions` / `mlm_labels`,
`pair_labels`), so `model(**batch)` works with the loader's batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.dropout import Dropout
from motian.model.transformer import KVCache, MotianModel, init_weights


@dataclass
class ModelOutput:
    """What every head returns. `loss` is set when labels were given; `losses` holds the
    unweighted per-task losses so a trainer can weight them (e.g. uncertainty weighting)."""

    loss: Tensor | None = None
    logits: Tensor | None = None  # the head's main output; see each head for its shape
    hidden_states: Tensor | None = None  # (B, L, hidden), last layer
    losses: dict[str, Tensor] = field(default_factory=dict)
    pair_logits: Tensor | None = None  # PreTrainingModel: (B, 2)
    end_logits: Tensor | None = None  # SpanExtraction: (B, L); `logits` holds the start logits
    exit_layers: Tensor | None = None  # EarlyExitClassification: (B,) blocks each row ran


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the output layer. The output
    weight is the word-embedding matrix when `tie_word_embeddings` (passed in by the owner)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.decoder = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden, config.vocab_size, bias=False))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        """h (..., hidden) -> logits (..., vocab)."""
        h = self.norm(F.gelu(self.dense(h)))
        weight = embedding if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)

    def candidate_logits(self, h: Tensor, embedding: Tensor, candidates: Tensor) -> Tensor:
        """h (N, hidden), candidates (N, k) token ids -> (N, k): the logits `forward` would give
        those k tokens, without the (N, vocab) output layer (MC-BERT's multi-choice scores)."""
        h = self.norm(F.gelu(self.dense(h)))
        weight = embedding if self.decoder is None else self.decoder.weight
        return torch.einsum("nh,nkh->nk", h, weight[candidates]) + self.bias[candidates]


def compact_mlm_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """HF form (B, L) with -100 at unmasked positions -> (flat positions (N,), labels (N,))."""
    flat = labels.reshape(-1)
    positions = (flat != -100).nonzero().squeeze(1)
    return positions, flat[positions]


def masked_lm_logits(model: MaskedLM | PreTrainingModel, h: Tensor) -> Tensor:
    """MLM logits of the hidden states `h`: (N, hidden) at the masked positions -> (N, vocab),
    or (B, L, hidden) -> (B, L, vocab).

    The output layer is hidden x vocab per position; computing it only where a loss is taken
    (~15% of tokens) is the largest single saving of an MLM step at small hidden sizes (measured
    in benchmarks/mlm_head.py, as in cramming). The heads go one step further and ask the
    backbone for the masked rows only (`output_positions`), so the last block's output
    projection and FFN are skipped elsewhere too (benchmarks/train_step.py).
    """
    return model.mlm(h, model.backbone.embeddings.word.weight)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the N masked positions; 0 (with a graph) when a batch has none,
    where `F.cross_entropy` would return NaN and poison the run."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


class _Backbone(nn.Module):
    """Shared plumbing: owns `backbone` and passes the contract's inputs through."""

    def __init__(self, config: ModelConfig, **head_kwargs):
        super().__init__()
        self.config = config
        self.head_kwargs = head_kwargs  # saved with checkpoints to rebuild the same head
        self.backbone = MotianModel(config)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
               document_ids: Tensor | None = None,
               output_positions: Tensor | None = None) -> Tensor:
        """Hidden states (B, L, hidden), or (N, hidden) at `output_positions` (flat into B * L)."""
        return self.backbone(input_ids, attention_mask, token_type_ids, position_ids, document_ids,
                             output_positions)

    def _init_head(self) -> None:
        for name, child in self.named_children():
            if name != "backbone":
                init_weights(child, self.config)


class MaskedLM(_Backbone):
    """Masked language model. `logits` is (N, vocab) at `mlm_positions`, or (B, L, vocab) when no
    positions are given; HF-style `labels` (B, L) with -100 are converted to the compact form.
    `hidden_states` is then (N, hidden), the masked rows only (see `MotianModel.forward`)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.mlm = MLMHead(config)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, mlm_positions: Tensor | None = None,
                mlm_labels: Tensor | None = None, labels: Tensor | None = None) -> ModelOutput:
        if labels is not None:
            mlm_positions, mlm_labels = compact_mlm_labels(labels)
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids, document_ids,
                        mlm_positions)  # (N, hidden), or (B, L, hidden) without positions
        logits = masked_lm_logits(self, h)
        out = ModelOutput(logits=logits, hidden_states=h)
        if mlm_labels is not None:
            out.loss = out.losses["mlm"] = mlm_loss(logits, mlm_labels)
        return out


def masked_mean(h: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, L, hidden) -> (B, hidden): the mean over the real tokens (all without a mask)."""
    if attention_mask is None:
        return h.mean(1)
    mask = attention_mask[:, :, None].to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class ClassifierHead(nn.Module):
    """[CLS] (or the mean of the real tokens, `config.classifier_pooling`) -> pooler (dense +
    tanh, as BERT) -> dropout -> linear to `num_labels`."""

    def __init__(self, config: ModelConfig, num_labels: int, pooling: str | None = None):
        super().__init__()
        self.pooling = pooling or config.classifier_pooling
        self.pooler = nn.Linear(config.hidden, config.hidden)
        self.dropout = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden, num_labels)

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """h (B, L, hidden) -> (B, num_labels), from the first token or the masked mean."""
        pooled = masked_mean(h, attention_mask) if self.pooling == "mean" else h[:, 0]
        return self.classifier(self.dropout(torch.tanh(self.pooler(pooled))))


class PreTrainingModel(_Backbone):
    """MLM + a pair task from [CLS] (sentence order, query-title click, or BERT's NSP).
    `losses` = {"mlm": ..., "pair": ...} unweighted; `loss` is their plain sum. With
    `mlm_positions`, the backbone computes its last block at the B [CLS] rows and the N masked
    rows only, and `hidden_states` is those rows, (B + N, hidden)."""

    def __init__(self, config: ModelConfig, num_pair_labels: int = 2):
        super().__init__(config, num_pair_labels=num_pair_labels)
        self.mlm = MLMHead(config)
        self.pair = ClassifierHead(config, num_pair_labels, pooling="cls")
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, mlm_positions: Tensor | None = None,
                mlm_labels: Tensor | None = None, pair_labels: Tensor | None = None,
                pair_weights: Tensor | None = None, labels: Tensor | None = None
                ) -> ModelOutput:
        if labels is not None:
            mlm_positions, mlm_labels = compact_mlm_labels(labels)
        B, L = input_ids.shape
        rows = None
        if mlm_positions is not None:  # [CLS] of every row, then the masked positions
            rows = torch.cat([torch.arange(B, device=input_ids.device) * L, mlm_positions])
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids, document_ids,
                        rows)  # (B + N, hidden), or (B, L, hidden) without positions
        cls, masked = (h[:, :1], h) if rows is None else (h[:B, None], h[B:])
        out = ModelOutput(logits=masked_lm_logits(self, masked), hidden_states=h,
                          pair_logits=self.pair(cls))
        if mlm_labels is not None:
            out.losses["mlm"] = mlm_loss(out.logits, mlm_labels)
        if pair_labels is not None:
            loss_sum, weight_sum = pair_loss_sum(out.pair_logits, pair_labels, pair_weights)
            out.losses["pair"] = loss_sum / weight_sum.clamp(min=1e-12)
        if out.losses:
            out.loss = sum(out.losses.values())
        return out


def pair_loss_sum(logits: Tensor, labels: Tensor, weights: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(sum of weight * cross-entropy, sum of weights) over the rows whose label is not -100
    (a corpus row in a mixed batch carries no pair label). The weighted mean is their ratio;
    the caller divides, so a batch without pair rows gives 0 / 0 it can skip."""
    keep = labels != -100
    w = keep.float() if weights is None else weights.float() * keep
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (ce * w).sum(), w.sum()


class SequenceClassification(_Backbone):
    """One label per sequence (or pair) from [CLS] or the token mean (`classifier_pooling`):
    logits (B, num_labels). `num_labels=1` is regression (MSE on float labels)."""

    def __init__(self, config: ModelConfig, num_labels: int = 2):
        super().__init__(config, num_labels=num_labels)
        self.num_labels = num_labels
        self.head = ClassifierHead(config, num_labels)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        out = ModelOutput(logits=self.head(h, attention_mask), hidden_states=h)
        if labels is not None:
            if self.num_labels == 1:
                out.loss = F.mse_loss(out.logits.float().squeeze(-1), labels.float())
            else:
                out.loss = F.cross_entropy(out.logits.float(), labels)
        return out


class TokenClassification(_Backbone):
    """One label per token (NER, segmentation): logits (B, L, num_labels); labels -100 ignored."""

    def __init__(self, config: ModelConfig, num_labels: int = 2):
        super().__init__(config, num_labels=num_labels)
        self.dropout = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden, num_labels)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(h))
        out = ModelOutput(logits=logits, hidden_states=h)
        if labels is not None:
            out.loss = F.cross_entropy(logits.float().flatten(0, 1), labels.reshape(-1),
                                       ignore_index=-100)
        return out


class SpanExtraction(_Backbone):
    """Extractive QA: start logits (B, L) in `logits`, end logits in `end_logits`; the loss is
    the mean of start and end cross-entropies over positions (as BERT on SQuAD)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.span = nn.Linear(config.hidden, 2)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                start_positions: Tensor | None = None,
                end_positions: Tensor | None = None) -> ModelOutput:
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        start, end = self.span(h).float().unbind(-1)  # (B, L) each
        if attention_mask is not None:  # an answer never starts or ends in padding
            start = start.masked_fill(attention_mask == 0, -1e4)
            end = end.masked_fill(attention_mask == 0, -1e4)
        out = ModelOutput(logits=start, end_logits=end, hidden_states=h)
        if start_positions is not None and end_positions is not None:
            out.loss = (F.cross_entropy(start, start_positions)
                        + F.cross_entropy(end, end_positions)) / 2
        return out


class MultipleChoice(_Backbone):
    """Pick one of C candidates: inputs (B, C, L) are scored as B * C sequences from [CLS];
    logits (B, C), labels (B,) the index of the right choice."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.head = ClassifierHead(config, 1)
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None) -> ModelOutput:
        B, C, L = input_ids.shape

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(B * C, L)

        h = self.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids))
        logits = self.head(h, flat(attention_mask)).view(B, C)
        out = ModelOutput(logits=logits, hidden_states=h)
        if labels is not None:
            out.loss = F.cross_entropy(logits.float(), labels)
        return out


class CausalLM(_Backbone):
    """Decoder language model (GPT-like; needs `causal=True`): logits (B, L, vocab) predict the
    next token; `labels` (B, L) are the inputs themselves (shifted here), -100 ignored."""

    def __init__(self, config: ModelConfig):
        if not config.causal:
            raise UserError("CausalLM needs a causal config (causal=True); an encoder would see "
                            "the token it must predict")
        super().__init__(config)
        # No extra LayerNorm: the backbone already ends in one (Pre-LN final_norm, as GPT-2's
        # ln_f; Post-LN's last block norm).
        self.decoder = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden, config.vocab_size, bias=False))
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, document_ids: Tensor | None = None,
                labels: Tensor | None = None,
                prefix_lengths: Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> ModelOutput:
        """`prefix_lengths` (B,): a prefix LM (UNILM, Dong et al. 2019, arXiv:1905.03197): the
        first prefix_lengths[b] tokens of row b (the source) see each other in both directions,
        the rest see the whole source and their own past. Set `labels` to -100 on the source
        to train on the target only. Without it, plain left-to-right attention.

        `cache`: a `KVCache` of the tokens already read (generation, motian.serving.generate);
        `input_ids` are then only the new tokens, and the cache is extended in place.

        `last_only`: logits (B, 1, vocab) of the last column only, what decoding reads: the
        last block's output projection and FFN and the output layer (vocab-wide) then run on
        one row per sequence instead of L (`MotianModel`'s `output_positions`)."""
        if prefix_lengths is not None:
            attention_mask = prefix_lm_mask(prefix_lengths, input_ids.shape[1], attention_mask)
        (B, L), rows = input_ids.shape, None
        if last_only and L > 1:
            rows = torch.arange(B, device=input_ids.device) * L + (L - 1)  # flat into B * L
        h = self.backbone(input_ids, attention_mask, None, position_ids, document_ids,
                          rows, cache=cache)
        if rows is not None:
            h = h[:, None]  # (B, 1, hidden)
        weight = (self.backbone.embeddings.word.weight if self.decoder is None
                  else self.decoder.weight)
        logits = F.linear(h, weight)  # (B, L, vocab)
        out = ModelOutput(logits=logits, hidden_states=h)
        if labels is not None:
            out.loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                       labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


def prefix_lm_mask(prefix_lengths: Tensor, L: int, attention_mask: Tensor | None) -> Tensor:
    """(B, L, L) visibility of a prefix LM: key j is seen by query i if j <= i or j is in the
    prefix; padding keys (attention_mask 0) are never seen."""
    j = torch.arange(L, device=prefix_lengths.device)
    visible = (j[None, :] <= j[:, None])[None] | (j < prefix_lengths[:, None])[:, None, :]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, :]
    return visible  # (B, L, L)


class UnifiedLM(MaskedLM):
    """UNILM (Dong et al. 2019, arXiv:1905.03197): a `MaskedLM` trained with the cloze
    objective under per-row self-attention masks (bidirectional, seq2seq, left-to-right,
    right-to-left; motian.model.masks, motian.train.unilm), given as a (B, L, L)
    `attention_mask`. The weights and forward are MaskedLM's; the class name tells
    `motian generate` that the model was trained to predict a [MASK] from its left context,
    so it can decode as a prefix LM (the prompt read bidirectionally, new tokens causally:
    motian.serving.prefix_decoding). Fine-tuning takes its `backbone` like any other head's."""


class ReplacedTokenDetection(_Backbone):
    """ELECTRA's discriminator (Clark et al. 2020, arXiv:2003.10555): `logits` (B, L), one per
    token, > 0 for "replaced" (dense + GELU + dense to 1, ELECTRA's discriminator head);
    `labels` (B, L) 1 replaced / 0 original / -100 ignored give the mean binary cross-entropy.
    With `multi_choice` it also has BERT's MLM head, read at masked positions to score
    candidate tokens (`choice_logits`; MC-BERT, Xu et al. 2020, arXiv:2006.05744). Trained by
    motian.train.replaced; fine-tuning takes its `backbone` like any other head's."""

    def __init__(self, config: ModelConfig, multi_choice: bool = False):
        super().__init__(config, multi_choice=multi_choice)
        self.rtd = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, 1))
        self.mlm = MLMHead(config) if multi_choice else None
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, labels: Tensor | None = None
                ) -> ModelOutput:
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids, document_ids)
        logits = self.rtd(h).squeeze(-1).float()  # (B, L)
        out = ModelOutput(logits=logits, hidden_states=h)
        if labels is not None:
            keep = labels != -100
            out.loss = out.losses["rtd"] = F.binary_cross_entropy_with_logits(
                logits[keep], labels[keep].float())
        return out

    def choice_logits(self, h: Tensor, candidates: Tensor) -> Tensor:
        """h (N, hidden) at the masked positions, candidates (N, k) token ids -> (N, k) scores:
        the MLM head's logits of the candidates only (h' . e_c + b_c, e the tied embeddings)."""
        if self.mlm is None:
            raise UserError("choice_logits needs a ReplacedTokenDetection built with "
                            "multi_choice=True (MC-BERT)")
        return self.mlm.candidate_logits(h, self.backbone.embeddings.word.weight, candidates)


# Head name -> class, for checkpoints that record which head they hold (io.py, hf.py).
HEADS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (MotianModel, MaskedLM, PreTrainingModel, SequenceClassification,
                TokenClassification, SpanExtraction, MultipleChoice, CausalLM,
                ReplacedTokenDetection, UnifiedLM)
}  # + Seq2SeqLM, registered by motian.model.seq2seq (imported by motian.model)
