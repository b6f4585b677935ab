"""Transformer-XL (Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context", arXiv:1901.02860): a causal LM with segment-level recurrence and its
relative position encoding.

**Recurrence (paper, section 3.2).** A segment of L tokens is read with a *memory*: for every
layer n, the hidden states that entered layer n for the last M tokens before the segment. Keys
and values of layer n are computed over [SG(memory^{n-1}) ; h^{n-1}] (M + L rows; SG = stop
gradient: the memory is detached), queries over the segment's L rows only. After the segment,
each layer's memory becomes the last M of those M + L rows. So the context reaches back
O(M * layers) tokens while one forward costs O(L * (M + L)).

**Relative encoding (paper, section 3.3, eq. for A^rel).** Query i and key j score

    A_ij = q_i . k_j  +  q_i . W_R R_{i-j}  +  u . k_j  +  v . W_R R_{i-j}
           (a) content   (b) content-position  (c) global content bias  (d) global position bias

with R the sinusoid of the distance i - j (Vaswani et al.), W_R a per-layer projection, and
u, v learned vectors per head, shared by all layers (as the paper's global biases). Grouping:
A_ij = (q_i + u) . k_j + (q_i + v) . W_R R_{i-j}. The position term is first scored against
every distance 0..M+L-1 (one (L, M+L) matmul) and then gathered at each (i, j) pair's distance:
the same values as the paper's "relative shift" trick, without its pad-and-reshape.

No absolute position enters the model, so the same weights read a segment at any offset in
the stream: that is what lets the memory be reused. The model config must say
`position: sinusoidal` (R is sinusoidal; no position is added to the embeddings) and
`causal: true` (the paper's language-modelling setting).

The memory's bookkeeping (which stream it belongs to, when it is written) is the training
objective's, `motian.train.xl`; this module only reads a memory and returns the next one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.dropout import Dropout, dropout
from motian.model.heads import HEADS
from motian.model.positions import sinusoid
from motian.model.transformer import FeedForward, init_weights


def check_xl_config(config: ModelConfig, memory: int) -> None:
    """Refuse settings under which Transformer-XL's recurrence means nothing."""
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise UserError(f"Transformer-XL: memory must be an integer >= 0 (tokens of the "
                        f"previous segments kept per layer), got {memory!r}")
    if not config.causal:
        raise UserError("Transformer-XL: the memory holds the *past* of a segment, so the model "
                        "must be causal (model causal: true); a bidirectional model would "
                        "need the future of the stream, which the recurrence never has")
    if config.position != "sinusoidal":
        raise UserError(f"Transformer-XL brings its own relative encoding (sinusoidal R_(i-j) "
                        f"with learned u, v); set model position: sinusoidal, got "
                        f"{config.position!r}")
    if config.attention != "full":
        raise UserError("Transformer-XL needs attention: full")


@dataclass
class XLOutput:
    logits: Tensor  # (B, L, vocab)
    hidden: list[Tensor]  # per layer, the (B, L, hidden) states that entered it: the next memory


class XLAttention(nn.Module):
    """Multi-head attention of one layer over [memory ; segment] with the relative score A^rel."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.position = nn.Linear(config.hidden, config.hidden, bias=False)  # W_{k,R}
        self.out = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: Tensor, context: Tensor, rel: Tensor, bias: Tensor, u: Tensor,
                v: Tensor) -> Tensor:
        """x (B, L, hidden) the segment, context (B, T, hidden) = [memory ; segment], T = M + L;
        rel (T, hidden) sinusoids of the distances 0..T-1; bias (B|1, 1, L, T) additive mask."""
        c = self.config
        B, L, H = x.shape
        T = context.shape[1]
        h, d = c.heads, c.head_dim
        q, k, val = self.qkv(context).view(B, T, 3, h, d).permute(2, 0, 3, 1, 4)
        q = q[:, :, T - L:]  # (B, h, L, d): only the segment asks
        r = self.position(rel.to(x.dtype)).view(T, h, d).transpose(0, 1)  # (h, T, d)
        content = (q + u[:, None]) @ k.transpose(-1, -2)  # (a) + (c): (B, h, L, T)
        by_distance = (q + v[:, None]) @ r.transpose(-1, -2)  # (b) + (d) per distance
        # Query i sits at slot M + i; key j at slot j: distance (M + i) - j, clamped for the
        # future keys, which the mask removes anyway.
        slot = torch.arange(T, device=x.device)
        distance = ((T - L) + slot[:L, None] - slot[None, :]).clamp(0, T - 1)  # (L, T)
        position = by_distance.gather(-1, distance.expand(B, h, L, T))
        scores = (content + position) / math.sqrt(d) + bias.to(content.dtype)
        probs = dropout(scores.softmax(dim=-1), c.attention_dropout, self.training)
        y = (probs @ val).transpose(1, 2).reshape(B, L, H)
        return self.out(y)


class XLBlock(nn.Module):
    """One layer: XL attention + feed-forward, Pre-LN or Post-LN as `config.norm`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.attention = XLAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, memory: Tensor | None, rel: Tensor, bias: Tensor, u: Tensor,
                v: Tensor) -> Tensor:
        context = x if memory is None else torch.cat([memory.to(x.dtype), x], dim=1)
        if self.pre_norm:
            y = self.attention(self.attention_norm(x), self.attention_norm(context), rel, bias,
                               u, v)
            x = x + self.dropout(y)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attention_norm(x + self.dropout(self.attention(x, context, rel, bias, u, v)))
        return self.ffn_norm(x + self.ffn(x))


class TransformerXLLM(nn.Module):
    """Transformer-XL language model: word embeddings, `layers` XL blocks, tied LM output.

    `forward(input_ids, memory=None, memory_length=None)`: `memory` is one (B, M, hidden)
    tensor per layer (or None: no memory), `memory_length` (B,) how many of its *last* slots
    hold real states (a fresh stream has 0; the others are masked). Returns the logits and the
    states that entered each layer, from which the caller makes the next memory
    (`next_memory`)."""

    def __init__(self, config: ModelConfig, memory: int = 0):
        super().__init__()
        check_xl_config(config, memory)
        self.config, self.memory = config, memory
        self.head_kwargs = {"memory": memory}  # save_pretrained records it beside the config
        self.word = nn.Embedding(config.vocab_size, config.hidden)
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(XLBlock(config) for _ in range(config.layers))
        self.final_norm = (nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
                           if config.norm == "pre" else None)
        # u and v of the paper: one vector per head, shared by every layer.
        self.u = nn.Parameter(torch.zeros(config.heads, config.head_dim))
        self.v = nn.Parameter(torch.zeros(config.heads, config.head_dim))
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden, config.vocab_size, bias=False))
        init_weights(self, config)
        nn.init.normal_(self.u, std=config.initializer_range)
        nn.init.normal_(self.v, std=config.initializer_range)

    def forward(self, input_ids: Tensor, memory: list[Tensor] | None = None,
                memory_length: Tensor | None = None, allowed: Tensor | None = None
                ) -> XLOutput:
        """`allowed` (B|1, L, M + L) bool replaces the mask (query i sees real memory and the
        segment up to i): the tests use it to read a long sequence as the recurrence would."""
        B, L = input_ids.shape
        M = 0 if memory is None else memory[0].shape[1]
        T, device = M + L, input_ids.device
        if allowed is None:
            allowed = xl_visibility(B, L, M, memory_length, device)
        bias = torch.where(allowed, 0.0, float("-inf"))[:, None]  # (B|1, 1, L, T)
        rel = sinusoid(torch.arange(T, device=device), self.config.hidden)  # (T, hidden)
        x = self.embedding_dropout(self.word(input_ids))
        hidden = []
        for n, block in enumerate(self.blocks):
            hidden.append(x)
            x = block(x, None if memory is None else memory[n], rel, bias, self.u, self.v)
        if self.final_norm is not None:
            x = self.final_norm(x)
        weight = self.word.weight if self.decoder is None else self.decoder.weight
        return XLOutput(logits=x @ weight.T + self.lm_bias, hidden=hidden)


def xl_visibility(B: int, L: int, M: int, memory_length: Tensor | None,
                  device: torch.device) -> Tensor:
    """(B|1, L, M + L) bool: query i (slot M + i) sees key slot j iff j <= M + i and, for a
    memory slot, it holds a real state (j >= M - memory_length)."""
    slot = torch.arange(M + L, device=device)
    allowed = (slot[None, :] <= M + slot[:L, None])[None]  # (1, L, T)
    if M and memory_length is not None:
        real = slot[None, :] >= M - memory_length.to(device).long()[:, None]  # (B, T)
        allowed = allowed & real[:, None, :]
    return allowed


def next_memory(memory: list[Tensor] | None, hidden: list[Tensor], size: int) -> list[Tensor]:
    """Each layer's new memory: the last `size` rows of [memory ; hidden], detached (the paper's
    SG: no gradient flows into an earlier segment)."""
    if memory is None:
        return [h.detach()[:, -size:] for h in hidden]
    return [torch.cat([m.to(h.dtype), h.detach()], dim=1)[:, -size:]
            for m, h in zip(memory, hidden)]


HEADS[TransformerXLLM.__name__] = TransformerXLLM  # from_pretrained rebuilds it by name
