"""SpanBERT's span boundary head (Joshi et al. 2020, "SpanBERT: Improving Pre-training by
Representing and Predicting Spans", TACL, arXiv:1907.10529, section 3.2).

For a masked span (s..e) and a token x_i in it, the head reads the encoder outputs of the two
boundary tokens and a learned embedding of the token's position relative to the span:

    h0 = [x_{s-1}; x_{e+1}; p_{i-s+1}]
    h1 = LayerNorm(GELU(W1 h0))
    y  = LayerNorm(GELU(W2 h1))

and y predicts x_i through the output embedding (tied to the word embeddings, as the MLM head)
with its own bias, "exactly like the MLM objective". The head is a pretraining-only module: the
objective owns it (`motian.train.sbo`), checkpoints save it, and final/ is the plain backbone
with its MLM head, as SpanBERT's released models are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.model.config import ModelConfig
from motian.model.transformer import init_weights


class SpanBoundaryHead(nn.Module):
    """(left, right, offset) -> (N, hidden) representations of the span tokens; `logits`
    projects them onto the vocabulary. `max_span` relative positions are learned; tokens
    further into a span share the last one (a Chinese span of 10 words can run to 30+
    characters, and a long tail would leave those embeddings barely trained)."""

    def __init__(self, config: ModelConfig, max_span: int):
        super().__init__()
        H = config.hidden
        self.max_span = max_span
        self.position = nn.Embedding(max_span, H)
        self.dense1 = nn.Linear(3 * H, H)
        self.norm1 = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dense2 = nn.Linear(H, H)
        self.norm2 = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        init_weights(self, config)

    def forward(self, left: Tensor, right: Tensor, offset: Tensor) -> Tensor:
        """left, right (N, hidden) boundary outputs; offset (N,) 0-based position in the span."""
        p = self.position(offset.clamp(max=self.max_span - 1))  # (N, hidden)
        h = self.norm1(F.gelu(self.dense1(torch.cat([left, right, p], dim=-1))))
        return self.norm2(F.gelu(self.dense2(h)))  # (N, hidden)

    def logits(self, y: Tensor, output_embedding: Tensor) -> Tensor:
        """(N, hidden) -> (N, vocab) with the model's output embedding (vocab, hidden)."""
        return F.linear(y, output_embedding, self.bias)


def output_embedding(model: nn.Module) -> Tensor:
    """The (vocab, hidden) matrix an MLM model predicts tokens with: the word embeddings when
    tied, else its MLM decoder."""
    decoder = getattr(model.mlm, "decoder", None)
    return model.backbone.embeddings.word.weight if decoder is None else decoder.weight
