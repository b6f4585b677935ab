"""XLNet's permutation language model on the motian encoder (Yang, Dai, Yang, Carbonell,
Salakhutdinov & Le 2019, "XLNet: Generalized Autoregressive Pretraining for Language
Understanding", arXiv:1906.08237, section 2.3).

**Factorisation order.** Each row gets a random order of its tokens, given as `rank` (B, L):
rank[b, i] is where token i comes in row b's order. The row's first token ([CLS]) is ranked
first in every order (always context, never predicted, as XLNet keeps its special tokens out
of the permutation); padding comes last and is never seen. Token i is predicted from the
tokens ranked before it: an autoregressive model over a random order, so each token learns
from context on both sides without any [MASK] in the input.

**Two streams (section 2.3, Figure 1).** One set of block weights runs two streams:

* the *content* stream h_i, an ordinary encoder state that sees the content of every token
  ranked at or before i (itself included): ``rank[j] <= rank[i]``;
* the *query* stream g_i, which starts from one learned vector w (`query_init`) plus the
  position information of i, and sees the content of the tokens ranked strictly before i,
  ``rank[j] < rank[i]``, never its own: it knows *where* it predicts, not *what*.

Both streams go through the backbone's own blocks side by side: the sequence
[h (L rows) ; g (P rows, one per predicted position)] with a (L + P, L + P) visibility where
content rows see content keys by the first rule, query rows content keys by the second, and no
row sees a query key. Each block therefore computes exactly XLNet's two updates with shared
weights (attention, FFN, norms), the content rows exactly as the encoder alone would with that
mask (tests/test_xlnet.py checks both), and nothing of the transformer is forked. The LM head
(BERT's MLM head, tied to the word embeddings) reads the query stream at the predicted
positions; the backbone computes its last block at those rows only.

**Positions.** The query rows carry the position ids of the tokens they predict, so every
scheme of the backbone applies unchanged: absolute / sinusoidal embeddings are added to w (as
to a word), and relative schemes (RoPE, T5, ALiBi, NEZHA) score query-key distances from the
same position ids. The xlnet-demo recipe uses RoPE: relative like XLNet's own encoding (so
the same weights read every offset, and rows longer than trained), and *signed*, where ALiBi's
bidirectional bias is -slope * |i - j|: a query whose start vector is the same w everywhere
would then not tell the token left of it from the one right of it (docs/objectives.md
measures both).

**Partial prediction (section 2.3).** Only the last ceil(n / K) tokens of each order are
predicted (n the row's tokens after [CLS]); the rest are context only. K = 6 or 7 in the
paper; it saves the query stream's cost and keeps every prediction's context long.

Fine-tuning uses the content stream alone with no permutation mask (as XLNet does): `backbone`
is an ordinary bidirectional `MotianModel`, which `motian finetune --model RUN/final` reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.heads import HEADS, MLMHead, ModelOutput, _Backbone


def check_xlnet_config(config: ModelConfig) -> None:
    """Refuse model settings the two-stream forward cannot run."""
    if config.causal:
        raise UserError("XLNet: the permutation masks replace causality; set model causal: false "
                        "(the factorisation order decides what each token sees)")
    if config.attention != "full":
        raise UserError("XLNet: the two streams need a (L + P, L + P) visibility mask; set "
                        "model attention: full (sliding attention takes no such mask)")


def predicted_counts(attention_mask: Tensor, k: int) -> Tensor:
    """(B,) tokens predicted per row: ceil(n / k), n = real tokens after the first ([CLS])."""
    n = (attention_mask.sum(1) - 1).clamp(min=0)
    return torch.div(n + k - 1, k, rounding_mode="floor")


def sample_order(attention_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """rank (B, L): a uniformly random factorisation order of each row's real tokens after the
    first, which is ranked 0; padding ranked after every real token."""
    B, L = attention_mask.shape
    keys = torch.rand(B, L, generator=generator, device=attention_mask.device)
    keys = keys.masked_fill(attention_mask == 0, 2.0)
    keys[:, 0] = -1.0
    return keys.argsort(dim=1).argsort(dim=1)


def prediction_targets(rank: Tensor, attention_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The positions to predict: the last ceil(n / k) ranks of each row's order. Returns
    `positions` (B, P) in increasing order (P the most of any row) and `valid` (B, P)."""
    counts = predicted_counts(attention_mask, k)  # (B,)
    n = (attention_mask.sum(1) - 1).clamp(min=0)
    # real tokens after [CLS] hold ranks 1..n; the last `count` of them are n - count + 1..n
    chosen = (attention_mask > 0) & (rank > (n - counts)[:, None]) & (rank >= 1)
    P = max(int(counts.max()), 1)
    positions = (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :P]  # chosen first
    valid = torch.arange(P, device=rank.device)[None, :] < counts[:, None]
    return positions, valid


def stream_visibility(rank: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(content, query), each (B, L, L) bool, True where query i may see the content of key j:
    content ``rank[j] <= rank[i]`` (itself included), query ``rank[j] < rank[i]`` (never
    itself); padding keys are never seen."""
    real = attention_mask.bool()[:, None, :]  # (B, 1, L) keys
    before = rank[:, None, :] < rank[:, :, None]  # (B, L, L): key j ranked before query i
    eye = torch.eye(rank.shape[1], dtype=torch.bool, device=rank.device)[None]
    return (before | eye) & real, before & real


def two_stream_visibility(rank: Tensor, attention_mask: Tensor, positions: Tensor,
                          valid: Tensor) -> Tensor:
    """(B, L + P, L + P) bool over [content rows ; query rows at `positions` (B, P)]: content
    rows see content keys by the content rule, query rows content keys by the query rule, no
    row sees a query key. An unused query slot (valid False) sees nothing; the backbone lets
    such a row see itself, and its output is never read."""
    content, query = stream_visibility(rank, attention_mask)
    B, L = rank.shape
    P = positions.shape[1]
    query = query.take_along_dim(positions[:, :, None], dim=1) & valid[:, :, None]  # (B, P, L)
    no_query_keys = torch.zeros(B, L + P, P, dtype=torch.bool, device=rank.device)
    return torch.cat([torch.cat([content, query], dim=1), no_query_keys], dim=2)


class XLNetLM(_Backbone):
    """The permutation LM: the motian encoder (`backbone`), the query stream's start vector w
    (`query_init`) and BERT's MLM head read at the query stream (module docstring).

    `forward(input_ids, rank, positions, valid, ...)` returns `logits` (N, vocab) at the valid
    predicted positions (row by row, in increasing position), and the loss with `labels` (N,)."""

    def __init__(self, config: ModelConfig):
        check_xlnet_config(config)
        super().__init__(config)
        self.query_init = nn.Parameter(torch.zeros(config.hidden))
        self.mlm = MLMHead(config)
        self._init_head()
        nn.init.normal_(self.query_init, std=config.initializer_range)

    def forward(self, input_ids: Tensor, rank: Tensor, positions: Tensor, valid: Tensor,
                attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, document_ids: Tensor | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        h = self.query_stream(input_ids, rank, positions, valid, attention_mask, token_type_ids,
                              position_ids, document_ids)  # (N, hidden)
        out = ModelOutput(logits=self.mlm(h, self.backbone.embeddings.word.weight),
                          hidden_states=h)
        if labels is not None:
            out.loss = out.losses["plm"] = nn.functional.cross_entropy(out.logits.float(),
                                                                       labels)
        return out

    def query_stream(self, input_ids: Tensor, rank: Tensor, positions: Tensor, valid: Tensor,
                     attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                     position_ids: Tensor | None = None, document_ids: Tensor | None = None,
                     all_layers: bool = False) -> Tensor:
        """The last layer's query stream (N, hidden) at the valid `positions`, or with
        `all_layers` the whole two-stream output (B, L + P, hidden)."""
        B, L = input_ids.shape
        P, device = positions.shape[1], input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(L, device=device)[None].expand(B, L)
        position_ids = position_ids.expand(B, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        def at_targets(t: Tensor) -> Tensor:
            return t.take_along_dim(positions, dim=1)  # (B, P)

        if self.config.position == "absolute" and L > self.config.max_positions:
            raise UserError(f"XLNet: rows of {L} tokens exceed max_positions="
                            f"{self.config.max_positions} of the 'absolute' scheme; use a longer "
                            "max_positions or a relative scheme (rope, t5, alibi)")
        emb = self.backbone.embeddings
        content = emb(input_ids, token_type_ids, position_ids)  # (B, L, hidden)
        query = emb(at_targets(input_ids), at_targets(token_type_ids), at_targets(position_ids),
                    words=self.query_init.to(content.dtype).expand(B, P, -1))  # (B, P, hidden)
        both_positions = torch.cat([position_ids, at_targets(position_ids)], dim=1)
        both_documents = (None if document_ids is None else
                          torch.cat([document_ids, at_targets(document_ids)], dim=1))
        visible = two_stream_visibility(rank, attention_mask, positions, valid)
        rows = None
        if not all_layers:  # the last block runs at the valid query rows only
            slot = torch.arange(B, device=device)[:, None] * (L + P) + L + torch.arange(
                P, device=device)[None, :]
            rows = slot[valid]
        return self.backbone(torch.cat([input_ids, at_targets(input_ids)], dim=1), visible,
                             None, both_positions, both_documents, rows,
                             inputs_embeds=torch.cat([content, query], dim=1))


HEADS[XLNetLM.__name__] = XLNetLM  # from_pretrained rebuilds it by name
