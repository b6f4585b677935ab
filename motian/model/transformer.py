"""The motian Transformer backbone: embeddings, attention, feed-forward, blocks, `MotianModel`.

Read top to bottom: `Embeddings` -> `Attention` -> `FeedForward` -> `Block` -> `MotianModel`.
One code path serves BERT (Post-LN, learned absolute positions), the Motian recipe (Pre-LN,
relative positions) and GPT-like decoders (`causal=True`); the differences are config values.
Attention goes through `torch.nn.functional.scaled_dot_product_attention` (SDPA) for every scheme
but NEZHA, whose value-side term needs the probabilities (see positions.py). Task heads that sit
on top of the (B, L, hidden) output live in heads.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.dropout import Dropout, dropout
from motian.model.positions import (
    T5Bias,
    TupeBias,
    alibi_bias,
    apply_rotary,
    deberta_bias,
    deberta_index,
    nezha_attention,
    nezha_index,
    nezha_table,
    rotary_tables,
    sinusoid,
)
from motian.model.sparse_attention import SlidingPlan, sliding_attention, sliding_plan


class Embeddings(nn.Module):
    """word + segment (+ absolute position) embeddings, then LayerNorm (as BERT; none with
    `embedding_norm=False`, as GPT-2) and dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.word = nn.Embedding(config.vocab_size, config.hidden)
        self.position = (nn.Embedding(config.max_positions, config.hidden)
                         if config.position == "absolute" else None)
        self.token_type = (nn.Embedding(config.type_vocab_size, config.hidden)
                           if config.type_vocab_size > 0 else None)
        self.norm = (nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
                     if config.embedding_norm else None)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None,
                position_ids: Tensor, words: Tensor | None = None) -> Tensor:
        """`words` (B, L, hidden): vectors to use instead of looking up `input_ids` (XLNet's
        query stream starts from one learned vector, motian.model.xlnet)."""
        x = self.word(input_ids) if words is None else words  # (B, L, hidden)
        if self.position is not None:
            x = x + self.position(position_ids)
        elif self.config.position == "sinusoidal":
            x = x + sinusoid(position_ids, self.config.hidden).to(x.dtype)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        return self.dropout(x if self.norm is None else self.norm(x))


@dataclass
class AttentionContext:
    """What every layer's attention needs, built once per forward by `MotianModel`."""

    mask: Tensor | None  # additive float (B|1, 1|h, L, L): 0 / -inf, plus any shared position bias
    is_causal: bool  # no mask tensor but a causal model: let SDPA pick its causal kernel
    scale: float  # multiplies q . k
    rotary: tuple[Tensor, Tensor] | None = None  # RoPE cos, sin (B|1, 1, L, d)
    relative_index: Tensor | None = None  # nezha / deberta: (B|1, L, L) row into the table
    relative_table: Tensor | None = None  # nezha: (2K+1, d); deberta: (2*span, hidden)
    sliding: SlidingPlan | None = None  # attention="sliding": banded masks (sparse_attention.py)


class LayerCache:
    """One layer's keys and values (B, heads, T, head_dim) of the tokens read so far."""

    def __init__(self):
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new tokens' k, v (B, heads, L, d); return all of them (B, heads, T + L, d)."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """What a causal model keeps of the tokens it has read, so generating one more token runs
    the model on that token alone instead of on the whole sequence again (a causal layer's keys
    and values of earlier tokens never change: they see only the past). Pass one to
    `MotianModel.forward(..., cache=)` (or `CausalLM`'s), which fills it in place.

    Besides each layer's keys and values it keeps, per key, its position (relative schemes
    score query-key distances: t5, alibi, nezha; RoPE keys are stored already rotated) and
    whether it is a real token (the left padding of a batch of prompts). TUPE and DeBERTa are
    not supported: their position terms would need more than the key positions kept here.

    `prefix=True` (a prefix LM, e.g. UNILM's seq2seq mode, decoding from a bidirectional
    model): the first `extend` reads the prompt, whose tokens see each other both ways; later
    tokens see the prefix and their own past, as always. A bidirectional model may use such a
    cache: its prefix keys depend only on the prefix, and later ones only on what precedes."""

    def __init__(self, layers: int, prefix: bool = False):
        self.layers = [LayerCache() for _ in range(layers)]
        self.prefix = prefix
        self.position_ids: Tensor | None = None  # (B, T)
        self.attention_mask: Tensor | None = None  # (B, T), 1 = a real token

    @property
    def length(self) -> int:
        """T, the tokens (padding included) read so far."""
        return 0 if self.position_ids is None else self.position_ids.shape[1]

    def extend(self, attention_mask: Tensor | None, position_ids: Tensor
               ) -> tuple[Tensor, Tensor]:
        """Record L new tokens; return the additive mask (B, 1, L, T + L) of their queries over
        all keys and the positions of all keys (B, T + L). Query i (slot T + i) sees real keys
        up to its own slot; one that sees none (a left-padding token) sees itself, as in
        `attention_mask_bias`, so cached and full computation agree token for token."""
        (B, L), device = position_ids.shape, position_ids.device  # (B, L) positions
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=device)
        if attention_mask.dim() != 2:
            raise UserError("a KV cache takes a (B, L) padding mask, not a (B, L, L) visibility "
                            "mask (prefix LM); run such a model without a cache")
        T = self.length
        if T:
            position_ids = torch.cat([self.position_ids, position_ids], dim=1)
            attention_mask = torch.cat([self.attention_mask, attention_mask], dim=1)
        self.position_ids, self.attention_mask = position_ids, attention_mask
        slot = torch.arange(T + L, device=device)
        allowed = attention_mask.bool()[:, None, :] & (slot[None, :] <= T + slot[:L, None])
        if self.prefix and T == 0:  # the prompt of a prefix LM: every real token of it
            allowed = attention_mask.bool()[:, None, :].expand(B, L, L)
        lonely = ~allowed.any(dim=-1, keepdim=True)  # (B, L, 1)
        allowed = allowed | (lonely & (slot[None, :] == T + slot[:L, None]))
        zero = torch.zeros((), device=device)
        return torch.where(allowed, zero, float("-inf"))[:, None], position_ids

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (B',) of the batch, in that order (beam search picks its beams)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.position_ids, self.attention_mask = self.position_ids[rows], self.attention_mask[rows]

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (UNILM decoding reads a [MASK] to predict
        the next token, then replaces it with the token chosen)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        self.position_ids = self.position_ids[:, :length]
        self.attention_mask = self.attention_mask[:, :length]


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection. `kept_heads` (a pruned layer,
    `ModelConfig.layer_heads`): the layer has only those of the config's heads, so q/k/v and
    the output projection are narrower (heads kept x head_dim)."""

    def __init__(self, config: ModelConfig, kept_heads: list[int] | None = None):
        super().__init__()
        self.config = config
        self.kept_heads = kept_heads
        self.heads = config.heads if kept_heads is None else len(kept_heads)
        inner = self.heads * config.head_dim
        self.qkv = nn.Linear(config.hidden, 3 * inner)
        self.out = nn.Linear(inner, config.hidden)
        # Set by `capture_internals` (distillation's attention matching): compute the
        # probabilities explicitly and keep them in `probs`; SDPA never returns them.
        self.keep_probs = False
        self.probs: Tensor | None = None

    def forward(self, x: Tensor, ctx: AttentionContext, rows: Tensor | None = None,
                kv: LayerCache | None = None) -> Tensor:
        """x (B, L, hidden) -> (B, L, hidden), or (N, hidden) for only the flat `rows` of B * L:
        then only those queries attend (every position still serves as a key and value).
        With `kv`, the new keys and values join the cached ones and the queries see all."""
        c = self.config
        B, L = x.shape[:2]
        H = self.heads * c.head_dim  # hidden, or less in a pruned layer
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, c.head_dim).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, heads, L, head_dim)
        if ctx.rotary is not None:
            q, k = apply_rotary(q, *ctx.rotary), apply_rotary(k, *ctx.rotary)
        if ctx.sliding is not None:  # Longformer: banded + global attention, O(L * w) memory
            if self.keep_probs:
                raise UserError("attention-map capture needs attention='full'; this model uses "
                                "sliding attention: match hidden states only")
            y = sliding_attention(q, k, v, ctx.sliding,
                                  c.attention_dropout if self.training else 0.0)
            y = y.transpose(1, 2).reshape(B, L, H)  # (B, L, hidden)
            return self.out(y if rows is None else y.reshape(-1, H)[rows])
        if kv is not None:
            k, v = kv.append(k, v)  # (B, heads, T + L, head_dim)
        mask = None if ctx.mask is None else ctx.mask.to(q.dtype)
        if self.kept_heads is not None and mask is not None and mask.shape[1] > 1:
            # a per-head position bias (B|1, heads, L, L) built for all heads: keep this layer's
            mask = mask.index_select(1, torch.tensor(self.kept_heads, device=mask.device))
        if c.position == "deberta":
            # DeBERTa's extra score terms are a per-layer bias; scaled like q . k.
            bias = deberta_bias(q, k, *self._relative_qk(ctx.relative_table),
                                ctx.relative_index) * ctx.scale
            mask = bias if mask is None else mask + bias
        is_causal, index, slots = ctx.is_causal, ctx.relative_index, None
        if rows is not None and rows.numel() > 0:
            slots, at = query_slots(rows, B, L)  # at: (B, M) position of each query slot
            q = q.take_along_dim(at[:, None, :, None], dim=2)  # (B, heads, M, head_dim)
            if is_causal:  # SDPA's is_causal assumes query i is position i: spell it out
                mask, is_causal = causal_bias(L, x.device), False
            if mask is not None:  # (B|1, 1|heads, L, L) -> (B, 1|heads, M, L)
                mask = mask.take_along_dim(at[:, None, :, None], dim=2)
            if index is not None:  # nezha: (B|1, L, L) -> (B, M, L)
                index = index.take_along_dim(at[:, :, None], dim=1)
        dropout_p = c.attention_dropout if self.training else 0.0
        if c.position == "nezha":
            y = nezha_attention(q, k, v, mask, index, ctx.relative_table, dropout_p)
        elif self.keep_probs:
            if is_causal:
                mask = causal_bias(L, x.device)
            scores = (q * ctx.scale) @ k.transpose(-1, -2)  # (B, heads, L or M, L)
            self.probs = (scores if mask is None else scores + mask).softmax(dim=-1)
            y = dropout(self.probs, dropout_p, self.training) @ v
        else:
            y = attention(q, k, v, mask, is_causal, ctx.scale, dropout_p)
        y = y.transpose(1, 2).reshape(B, -1, H)  # (B, L or M, hidden)
        if rows is not None:
            y = y.reshape(-1, H)[rows if slots is None else slots]  # (N, hidden)
        return self.out(y)

    def _relative_qk(self, rel: Tensor) -> tuple[Tensor, Tensor]:
        """Project DeBERTa's shared relative embeddings (2*span, hidden) with this layer's query
        and key weights -> two (heads, 2*span, head_dim) tables."""
        c = self.config
        rq, rk, _ = self.qkv(rel).view(rel.shape[0], 3, self.heads, c.head_dim).unbind(1)
        return rq.transpose(0, 1), rk.transpose(0, 1)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
              scale: float, dropout_p: float) -> Tensor:
    """softmax(q k^T * scale + mask) v with dropout on the probabilities; q, k, v (B, h, L, d).

    SDPA everywhere except one case: training with attention dropout on CPU, where SDPA falls
    back to its unfused math path and draws the dropout mask with torch's slow per-element
    Bernoulli. There the same math is spelled out with motian's cheap `dropout` (see
    dropout.py): at the benchmark shape it is the faster of the two (docs/model.md).
    """
    if dropout_p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)
    scores = (q * scale) @ k.transpose(-1, -2)  # (B, h, L, L); scaling q is the smaller pass
    if is_causal:
        mask = causal_bias(q.shape[-2], q.device)
    if mask is not None:
        scores = scores + mask
    return dropout(scores.softmax(dim=-1), dropout_p, training=True) @ v


def query_slots(rows: Tensor, B: int, L: int) -> tuple[Tensor, Tensor]:
    """Group flat `rows` (N,) of B * L by sequence for attention at those queries only.

    Returns `slots` (N,), where each row's output lands in a (B * M) layout, and `at` (B, M),
    the position in its sequence of every slot, M being the most rows any sequence has. Unused
    slots point at position 0; their outputs are computed and never read.
    """
    seq, pos = rows // L, rows % L
    counts = torch.bincount(seq, minlength=B)  # (B,)
    M = int(counts.max())
    order = torch.argsort(seq, stable=True)
    starts = torch.cumsum(counts, 0) - counts  # first sorted index of each sequence
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(len(rows), device=rows.device) - starts[seq[order]]
    at = torch.zeros(B, M, dtype=torch.long, device=rows.device)
    at[seq, rank] = pos
    return seq * M + rank, at


class FeedForward(nn.Module):
    """hidden -> ffn -> hidden with GELU, or GEGLU: gelu(x W) * (x V) (Shazeer 2020).
    `width`: the inner size when not `config.ffn` (a pruned layer)."""

    def __init__(self, config: ModelConfig, width: int | None = None):
        super().__init__()
        self.gated = config.activation == "geglu"
        width = config.ffn if width is None else width
        self.up = nn.Linear(config.hidden, width * (2 if self.gated else 1))
        self.down = nn.Linear(width, config.hidden)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (B, L, ffn) or (B, L, 2 * ffn)
        if self.gated:
            gate, h = h.chunk(2, dim=-1)
            h = F.gelu(gate) * h
        else:
            h = F.gelu(h)  # exact erf GELU, as BERT's "gelu"
        return self.dropout(self.down(h))


class Block(nn.Module):
    """One Transformer layer. Post-LN (BERT): x = LN(x + f(x)); Pre-LN: x = x + f(LN(x)).
    Pre-LN keeps an identity path from output to input, so gradients stay well scaled at depth
    and training needs no long warm-up (Xiong et al. 2020) - the Motian recipe's choice."""

    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.attention = Attention(config, config.kept_heads(index))  # index: for pruned sizes
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config, config.ffn_width(index))
        self.ffn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, ctx: AttentionContext, rows: Tensor | None = None,
                kv: LayerCache | None = None) -> Tensor:
        """x (B, L, hidden) -> (B, L, hidden); with `rows` (N,) flat indices into B * L, only
        those outputs (N, hidden): attention still reads every position, but its output
        projection, the residual, the norms and the FFN run on N rows instead of B * L.
        `kv`: this layer's part of a `KVCache`."""
        residual = x if rows is None else x.reshape(-1, x.shape[-1])[rows]
        if self.pre_norm:
            x = residual + self.dropout(self.attention(self.attention_norm(x), ctx, rows, kv))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attention_norm(residual + self.dropout(self.attention(x, ctx, rows, kv)))
        return self.ffn_norm(x + self.ffn(x))


def attention_mask_bias(attention_mask: Tensor | None, document_ids: Tensor | None,
                        causal: bool, L: int, device: torch.device) -> Tensor | None:
    """Additive mask (B|1, 1, L, L), 0 where query i may see key j and -inf elsewhere, or None
    when nothing is masked. Combines key padding, the block-diagonal document mask and causality.
    `attention_mask` is (B, L) key padding, or (B, L, L) query-key visibility that replaces
    causality.

    A query that may see no key at all (a padding query whose document id matches no real
    token, an all-padding row) would get an all -inf row and softmax would return NaN; such a
    query sees itself instead. Real tokens always see themselves, so no real output changes, and
    padding queries that do see real keys keep them (as in BERT), so padded outputs match it too.
    """
    allowed = None
    if attention_mask is not None and attention_mask.dim() == 3:
        # (B, L, L): the caller says exactly which key each query sees (e.g. CausalLM's prefix
        # LM), causality included, so the causal triangle is not added on top.
        allowed, causal = attention_mask.bool(), False
    # A batch without padding skips the mask (and keeps SDPA's fastest kernels); the check costs
    # one device sync per forward.
    elif attention_mask is not None and not bool(attention_mask.all()):
        allowed = attention_mask.bool()[:, None, :]  # (B, 1, L): key j is a real token
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, L, L)
        allowed = same if allowed is None else allowed & same
    if causal and allowed is not None:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=device).tril()
    if allowed is None:
        return None
    lonely = ~allowed.any(dim=-1, keepdim=True)  # (B, L, 1) queries that see nothing
    # eye in float, then compared: onnxruntime has no boolean EyeLike kernel, so a bool eye
    # would make every exported ONNX model unloadable.
    allowed = allowed | (lonely & (torch.eye(L, device=device) > 0))
    zero = torch.zeros((), device=device)
    return torch.where(allowed, zero, float("-inf"))[:, None]  # (B, 1, L, L)


def causal_bias(L: int, device: torch.device) -> Tensor:
    """(1, 1, L, L) additive causal mask, for when a position bias rules out SDPA's is_causal."""
    future = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(L, L, device=device).masked_fill(future, float("-inf"))[None, None]


class MotianModel(nn.Module):
    """The backbone: embeddings, `layers` blocks, a final LayerNorm for Pre-LN. Returns the last
    hidden states (B, L, hidden); heads.py adds the task outputs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.layers))
        # Pre-LN leaves the residual stream unnormalised; one LayerNorm at the end fixes its scale.
        self.final_norm = (nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
                           if config.norm == "pre" else None)
        self.t5_bias = T5Bias(config) if config.position == "t5" else None
        self.tupe_bias = TupeBias(config) if config.position == "tupe" else None
        if config.position == "deberta":  # shared by all layers, as in DeBERTa
            self.relative_embeddings = nn.Embedding(2 * config.max_relative_position, config.hidden)
            self.relative_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        init_weights(self, config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None,
                output_positions: Tensor | None = None,
                cache: KVCache | None = None, global_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """input_ids (B, L) -> hidden states (B, L, hidden); see the batch contract in
        docs/model.md. `document_ids` is ignored unless `cross_document_attention` is False.

        `output_positions` (N,) flat indices into B * L: return only those rows, (N, hidden).
        A loss read at a few positions (MLM at ~15%, [CLS] for a pair task) needs the last
        block only there, so its output projection and FFN - the bulk of a layer's FLOPs - run
        on N rows instead of B * L; the result at those rows is the same.

        `cache` (causal models): the `KVCache` of the tokens read before these; the new tokens
        attend to them and are added to it. `attention_mask` is then (B, L) for the new tokens
        and `position_ids` default to continuing after the cached ones.

        `global_mask` (B, L), attention="sliding" only: 1 marks a global token (Longformer),
        which sees and is seen by every token; ignored by full attention, where all are.

        `inputs_embeds` (B, L, hidden): the embedding output to run the blocks on instead of
        embedding `input_ids`, which then only give the shape (XLNet's two streams side by
        side, motian.model.xlnet)."""
        c = self.config
        L = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=input_ids.device)[None]  # (1, L)
        if cache is not None:  # the cache keeps a position per row and key
            position_ids = position_ids.expand(input_ids.shape[0], L)
        # with inputs_embeds (XLNet's two streams) rows share positions: the largest is the length
        length = start + L if inputs_embeds is None else int(position_ids.max()) + 1
        if c.position in ("absolute", "tupe") and length > c.max_positions:
            raise UserError(f"sequence length {length} exceeds max_positions="
                            f"{c.max_positions} of the "
                            f"'{c.position}' scheme, which cannot extrapolate; use a longer "
                            "max_positions or a relative scheme (t5, alibi, rope, nezha, deberta)")
        x = (self.embeddings(input_ids, token_type_ids, position_ids) if inputs_embeds is None
             else inputs_embeds)
        ctx = self._attention_context(attention_mask, document_ids, position_ids, L, cache,
                                      global_mask)
        for i, block in enumerate(self.blocks):
            rows = output_positions if i == len(self.blocks) - 1 else None
            kv = None if cache is None else cache.layers[i]
            if c.checkpoint_activations and self.training:
                x = checkpoint(block, x, ctx, rows, kv, use_reentrant=False)
            else:
                x = block(x, ctx, rows, kv)
        return x if self.final_norm is None else self.final_norm(x)

    def _attention_context(self, attention_mask: Tensor | None, document_ids: Tensor | None,
                           position_ids: Tensor, L: int,
                           cache: KVCache | None = None,
                           global_mask: Tensor | None = None) -> AttentionContext:
        c, device = self.config, position_ids.device
        if c.cross_document_attention:
            document_ids = None
        if c.attention == "sliding":  # no (L, L) mask or bias anywhere: see sparse_attention.py
            if cache is not None:
                raise UserError("a KV cache needs attention='full'; this model uses sliding "
                                "attention: generate without a cache")
            plan = sliding_plan(c, attention_mask, document_ids, position_ids, global_mask,
                                self.t5_bias)
            rotary = (rotary_tables(position_ids, c.head_dim, c.rope_base)
                      if c.position == "rope" else None)
            return AttentionContext(mask=None, is_causal=False, scale=plan.scale, rotary=rotary,
                                    sliding=plan)
        key_ids = None  # positions of the keys when they are not the queries (a KV cache)
        if cache is not None:
            if (not c.causal and not cache.prefix) or c.position in ("tupe", "deberta"):
                raise UserError(f"a KV cache needs a causal model with position absolute, "
                                f"sinusoidal, rope, alibi, t5 or nezha; this one is "
                                f"{'causal' if c.causal else 'bidirectional'} with "
                                f"'{c.position}' positions: run it without a cache")
            mask, key_ids = cache.extend(attention_mask, position_ids)
        else:
            mask = attention_mask_bias(attention_mask, document_ids, c.causal, L, device)
        bias = self._position_bias(position_ids, key_ids)  # shared by all layers, or None
        # SDPA takes is_causal or an attn_mask, not both: a causal model with score terms gets
        # its causal mask as a tensor, folded into the bias.
        adds_scores = bias is not None or c.position in ("nezha", "deberta")
        if c.causal and mask is None and adds_scores:
            mask = causal_bias(L, device)
        if bias is not None:
            mask = bias if mask is None else mask + bias  # (B|1, heads, L, L)
        scale = 1.0 / math.sqrt(c.head_dim)
        if c.position == "tupe":  # content and position terms each get 1/sqrt(2d)
            scale = 1.0 / math.sqrt(2 * c.head_dim)
        elif c.position == "deberta":  # c2c, c2p, p2c: 1/sqrt(3d)
            scale = 1.0 / math.sqrt(3 * c.head_dim)
        ctx = AttentionContext(mask=mask, is_causal=c.causal and mask is None, scale=scale)
        if c.position == "rope":
            ctx.rotary = rotary_tables(position_ids, c.head_dim, c.rope_base)
        elif c.position == "nezha":
            ctx.relative_index = nezha_index(position_ids, c.max_relative_position, key_ids)
            ctx.relative_table = nezha_table(c.max_relative_position, c.head_dim, device)
        elif c.position == "deberta":
            ctx.relative_index = deberta_index(position_ids, c.max_relative_position)
            ctx.relative_table = self.relative_norm(self.relative_embeddings.weight)
        return ctx

    def _position_bias(self, position_ids: Tensor, key_ids: Tensor | None = None
                       ) -> Tensor | None:
        if self.t5_bias is not None:
            return self.t5_bias(position_ids, key_ids)
        if self.tupe_bias is not None:
            return self.tupe_bias(position_ids)
        if self.config.position == "alibi":
            return alibi_bias(position_ids, self.config.heads, key_ids)
        return None


@dataclass
class Internals:
    """What `capture_internals` records during each forward: `hidden` = [embeddings output,
    block 1 output, ..., block N output], each (B, L, hidden) (the last block (N, hidden) when
    the forward asked for `output_positions`); `attention` = each block's probabilities
    (B, heads, L, L), when asked for."""

    hidden: list[Tensor] = field(default_factory=list)
    attention: list[Tensor] = field(default_factory=list)


@contextmanager
def capture_internals(backbone: MotianModel, attention: bool = False) -> Iterator[Internals]:
    """Record every layer's hidden states (and attention probabilities if `attention`) of the
    forwards run inside the `with`; what a distillation loss matches. Forward hooks, so the
    forward signatures and the fast path stay as they are; each forward starts a fresh record.
    Attention maps cost an explicit (B, heads, L, L) softmax per layer instead of SDPA."""
    record = Internals()

    def on_embeddings(module, args, output):
        record.hidden[:] = [output]
        record.attention.clear()

    def on_block(module, args, output):
        record.hidden.append(output)

    def on_attention(module, args, output):
        record.attention.append(module.probs)
        module.probs = None

    handles = [backbone.embeddings.register_forward_hook(on_embeddings)]
    handles += [b.register_forward_hook(on_block) for b in backbone.blocks]
    if attention:
        if backbone.config.position == "nezha":
            raise UserError("attention-map capture does not support NEZHA positions (their "
                            "probabilities stay inside nezha_attention); match hidden states only")
        handles += [b.attention.register_forward_hook(on_attention) for b in backbone.blocks]
        for b in backbone.blocks:
            b.attention.keep_probs = True
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
        for b in backbone.blocks:
            b.attention.keep_probs, b.attention.probs = False, None


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """BERT initialisation: Linear and Embedding weights ~ N(0, initializer_range), biases 0,
    LayerNorm weight 1 and bias 0 (Devlin et al. 2019; HF `BertPreTrainedModel._init_weights`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=config.initializer_range)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
