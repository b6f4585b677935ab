"""Longformer attention (Beltagy et al. 2020, arXiv:2004.05150): `ModelConfig.attention="sliding"`.

Each token attends to `attention_window` (w) tokens on each side of it, every `dilation`-th one
(dilation may differ per head, as the paper's dilated heads), plus a few *global* tokens: global
tokens ([CLS] with `global_attention="cls"`, or positions a task marks with `global_mask`) attend
to every token and every token attends to them. Memory grows as O(L * w), never O(L^2):

- queries are cut into blocks of c tokens (c = w, as the paper's chunks); block b needs keys
  [b*c - P, b*c + c + P) with P = w * max dilation (the reach of the band). Those key windows are
  one strided view of the padded keys (`Tensor.unfold`), so scores are (B, h, L/c, c, c + 2P):
  L * (w + 2P) per head, never L * L. Scores outside a head's band (|offset| > w*d, or offset
  not a multiple of d) are masked, which wastes (c + 2P) / (2w + 1) of the arithmetic for the
  sake of one vectorised matmul with no Python loop over blocks.
- the global keys are appended to every block's keys as G extra columns (and removed from the
  band so no key is counted twice); global queries get their own full (G, L) attention rows.

Everything that applies to full attention applies inside the band: key padding, the document
mask of packed sequences (`cross_document_attention=False`), causality, and the relative position
schemes, whose terms are computed for the banded (query, key) distances: ALiBi and T5 biases,
NEZHA's key and value terms, RoPE (which rotates q and k before this, nothing to do here).
Learned absolute and sinusoidal positions live in the embeddings. DeBERTa and TUPE are refused:
their terms would need their own banded re-implementation (TUPE also has a learned table indexed
by absolute position).

Global attention reuses the layer's q/k/v projections; the paper's second set of projections for
global attention (initialised as copies of the first) is not implemented.

With a window that covers the sequence the result equals full attention (tests/test_longformer.py).
The per-forward `SlidingPlan` (masks and position terms for the band) is built once by
`MotianModel` and shared by all layers, as the full-attention mask is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from motian.errors import UserError
from motian.model.dropout import dropout
from motian.model.positions import alibi_slopes, nezha_table, t5_buckets


def head_dilations(config) -> list[int]:
    """`attention_dilation` as one value per head (the config checked it, see config.py)."""
    d = config.attention_dilation
    return list(d) if isinstance(d, list | tuple) else [d] * config.heads


@dataclass
class SlidingPlan:
    """Masks and position terms of one forward, shared by all layers. Shapes use n = ceil(L / c)
    blocks of c queries, S = c + 2P banded keys per block and G global tokens (max over rows)."""

    length: int  # L
    chunk: int  # c
    reach: int  # P: keys padded by P on each side
    bias: Tensor  # (B|1, h|1, n, c, S + G) additive: 0 / -inf mask plus ALiBi / T5 terms
    global_at: Tensor | None = None  # (B, G) position of each global slot (0 for unused slots)
    global_out: Tensor | None = None  # (B, G) where its output goes (L for unused slots)
    global_bias: Tensor | None = None  # (B, h|1, G, L) bias of the global queries' rows
    index: Tensor | None = None  # nezha: (B|1, n, c, S + G) row into `table`
    global_index: Tensor | None = None  # nezha: (B, G, L)
    table: Tensor | None = None  # nezha: (2K + 1, head_dim)
    scale: float = 1.0


def sliding_plan(config, attention_mask: Tensor | None, document_ids: Tensor | None,
                 position_ids: Tensor, global_mask: Tensor | None, t5_bias=None) -> SlidingPlan:
    """Build the banded masks and position terms for queries and keys at `position_ids` (B|1, L).

    `attention_mask` (B, L): 1 = real token; `document_ids` (B, L) or None (attend across
    documents); `global_mask` (B, L): 1 = a global token (ORed with `global_attention="cls"`);
    `t5_bias`: the model's `T5Bias` for position="t5"."""
    c = config
    if attention_mask is not None and attention_mask.dim() != 2:
        raise UserError("attention='sliding' takes a (B, L) padding mask, not a (B, L, L) "
                        "visibility mask (prefix LM); use attention='full' for such a model")
    L, device = position_ids.shape[-1], position_ids.device
    B = max(t.shape[0] for t in (position_ids, attention_mask, document_ids, global_mask)
            if t is not None)
    dil = torch.tensor(head_dilations(c), device=device)  # (h,)
    chunk = min(c.attention_window, L)
    reach = min(c.attention_window * int(dil.max()), L - 1)  # P: further keys never exist
    n = -(-L // chunk)
    S = chunk + 2 * reach

    def band(x: Tensor, fill) -> Tensor:
        """(N, L) per-key values -> (N, n, S): each block's banded keys (fill outside [0, L))."""
        if x.dtype == torch.bool:
            return band(x.to(torch.uint8), int(fill)).bool()
        x = F.pad(x, (reach, reach + n * chunk - L), value=fill)
        return x.unfold(1, S, chunk)

    def blocks(x: Tensor, fill) -> Tensor:
        """(N, L) per-query values -> (N, n, c)."""
        if x.dtype == torch.bool:
            return blocks(x.to(torch.uint8), int(fill)).bool()
        return F.pad(x, (0, n * chunk - L), value=fill).view(x.shape[0], n, chunk)

    slot = torch.arange(L, device=device)[None]  # (1, L)
    q_slot = torch.arange(n * chunk, device=device).view(1, n, chunk)  # (1, n, c)
    k_slot = torch.arange(-reach, n * chunk + reach, device=device).unfold(0, S, chunk)[None]
    offset = k_slot[:, :, None, :] - q_slot[..., None]  # (1, n, c, S): key slot - query slot
    # A head with dilation d sees offsets 0, +-d, ..., +-w*d (the paper's dilated window).
    d = dil[:, None, None, None]
    in_band = (offset.abs() <= c.attention_window * d) & (offset % d == 0)  # (h, n, c, S)
    in_range = (k_slot >= 0) & (k_slot < L)  # (1, n, S): not the zero padding
    allowed = in_band[None] & in_range[:, None, :, None, :]  # (1, h, n, c, S)
    real = (torch.ones(1, L, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool())  # (B|1, L)
    is_global = (position_ids == 0) if c.global_attention == "cls" else torch.zeros_like(real)
    if global_mask is not None:
        is_global = is_global | global_mask.bool()
    is_global = is_global.expand(B, L)
    # Global keys leave the band: they come back as the G extra columns below.
    allowed = allowed & band(real & ~is_global, False)[:, None, :, None, :]  # (B, h, n, c, S)
    if document_ids is not None:
        same_doc = band(document_ids, -1)[:, :, None, :] == blocks(document_ids, -2)[..., None]
        allowed = allowed & same_doc[:, None]
    if c.causal:
        allowed = allowed & (offset <= 0)[:, None]
    is_self = (offset == 0)[:, None] & ~blocks(is_global, False)[:, None, :, :, None]
    positions = position_ids.expand(B, L)
    key_pos = band(positions, 0)  # (B, n, S)
    G = int(is_global.sum(dim=1).max())
    plan = SlidingPlan(length=L, chunk=chunk, reach=reach, bias=allowed,
                       scale=1.0 / c.head_dim ** 0.5)
    if G:
        # Global slots: the first G positions of each row with is_global first (stable order).
        order = torch.argsort((~is_global).int(), dim=1, stable=True)[:, :G]  # (B, G)
        used = torch.arange(G, device=device)[None] < is_global.sum(dim=1, keepdim=True)
        g_at = torch.where(used, order, 0)
        plan.global_at, plan.global_out = g_at, torch.where(used, order, L)
        g_ok = used & real.expand(B, L).take_along_dim(g_at, dim=1)  # (B, G) real global keys
        col = g_ok[:, None, None, :].expand(B, n, chunk, G)
        g_row = None  # (B, G, L) which keys each global query sees
        if document_ids is not None:
            g_doc = document_ids.take_along_dim(g_at, dim=1)  # (B, G)
            col = col & (blocks(document_ids, -2)[..., None] == g_doc[:, None, None, :])
            g_row = document_ids[:, None, :] == g_doc[..., None]
        if c.causal:
            col = col & (g_at[:, None, None, :] <= q_slot[..., None])
            later = slot[:, None, :] <= g_at[..., None]
            g_row = later if g_row is None else g_row & later
        g_row = real[:, None, :] if g_row is None else g_row & real[:, None, :]
        g_self = slot[:, None, :] == g_at[..., None]
        g_row = g_row | (~g_row.any(-1, keepdim=True) & g_self)  # never an all -inf row
        plan.global_bias = _additive(g_row[:, None])  # (B, 1, G, L)
        allowed = torch.cat([allowed, col[:, None].expand(-1, allowed.shape[1], -1, -1, -1)], -1)
        self_col = (g_at[:, None, None, :] == q_slot[..., None]) & used[:, None, None, :]
        is_self = torch.cat([is_self.expand(B, -1, -1, -1, -1),
                             self_col[:, None].expand(B, is_self.shape[1], -1, -1, -1)], -1)
        key_pos = torch.cat([key_pos, positions.take_along_dim(g_at, dim=1)[:, None, :]
                            .expand(B, n, G)], -1)  # (B, n, S + G)
        g_rel = positions[:, None, :] - positions.take_along_dim(g_at, dim=1)[..., None]
    # A query that may see nothing (a padding query in a block of padding) sees itself, as in
    # `attention_mask_bias`, so softmax never returns NaN and padded outputs match full attention.
    allowed = allowed | (~allowed.any(-1, keepdim=True) & is_self)
    plan.bias = _additive(allowed)
    rel = key_pos[:, :, None, :] - blocks(positions, 0)[..., None]  # (B, n, c, S + G)
    plan.bias = plan.bias + _position_terms(c, rel, t5_bias, dims=(0, 4, 1, 2, 3))
    if G and c.position in ("alibi", "t5"):
        plan.global_bias = plan.global_bias + _position_terms(c, g_rel, t5_bias, dims=(0, 3, 1, 2))
    if c.position == "nezha":
        K = c.max_relative_position
        plan.table = nezha_table(K, c.head_dim, device)
        plan.index = rel.clamp(-K, K) + K
        if G:
            plan.global_index = g_rel.clamp(-K, K) + K
    return plan


def _additive(allowed: Tensor) -> Tensor:
    return torch.where(allowed, torch.zeros((), device=allowed.device), float("-inf"))


def _position_terms(config, rel: Tensor, t5_bias, dims: tuple[int, ...]) -> Tensor | float:
    """ALiBi / T5 score terms for signed distances `rel` (key - query), heads moved to dim 1."""
    if config.position == "alibi":
        slopes = alibi_slopes(config.heads).to(rel.device)
        return (-slopes * rel.abs().float()[..., None]).permute(*dims)
    if config.position == "t5":
        buckets = t5_buckets(rel, not config.causal, config.relative_buckets,
                             config.relative_max_distance)
        return t5_bias.embedding(buckets).permute(*dims)
    return 0.0


def sliding_attention(q: Tensor, k: Tensor, v: Tensor, plan: SlidingPlan,
                      dropout_p: float) -> Tensor:
    """Banded + global attention; q, k, v (B, h, L, d) -> (B, h, L, d)."""
    B, h, L, d = q.shape
    c, P = plan.chunk, plan.reach
    n = -(-L // c)

    def band(x: Tensor) -> Tensor:  # (B, h, L, d) -> (B, h, n, S, d), a view of the padded x
        return F.pad(x, (0, 0, P, P + n * c - L)).unfold(2, c + 2 * P, c).transpose(-1, -2)

    keys, values = band(k), band(v)
    if plan.global_at is not None:
        at = plan.global_at[:, None, :, None]  # (B, 1, G, 1)
        g_k, g_v = k.take_along_dim(at, dim=2), v.take_along_dim(at, dim=2)  # (B, h, G, d)
        G = g_k.shape[2]
        keys = torch.cat([keys, g_k[:, :, None].expand(B, h, n, G, d)], dim=3)
        values = torch.cat([values, g_v[:, :, None].expand(B, h, n, G, d)], dim=3)
    q_blocks = F.pad(q, (0, 0, 0, n * c - L)).view(B, h, n, c, d)
    y = _attend(q_blocks, keys, values, plan.bias, plan.index, plan.table, plan.scale, dropout_p)
    y = y.reshape(B, h, n * c, d)[:, :, :L]
    if plan.global_at is None:
        return y
    # Global queries attend to every key; their rows replace the banded ones. Unused slots
    # write to a scratch position L, dropped after.
    g_q = q.take_along_dim(at, dim=2)  # (B, h, G, d)
    g_y = _attend(g_q, k, v, plan.global_bias, plan.global_index, plan.table, plan.scale,
                  dropout_p)
    y = torch.cat([y, y.new_zeros(B, h, 1, d)], dim=2)
    out = plan.global_out[:, None, :, None].expand(B, h, -1, d)
    return y.scatter(2, out, g_y)[:, :, :L]


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor | None,
            table: Tensor | None, scale: float, dropout_p: float) -> Tensor:
    """softmax((q k^T [+ NEZHA key term]) * scale + bias) v [+ NEZHA value term].
    q (B, h, ..., M, d); k, v (B, h, ..., S, d); bias broadcastable to (B, h, ..., M, S);
    index (B, ..., M, S) into the NEZHA table (2K+1, d), as in `positions.nezha_attention`."""
    scores = q @ k.transpose(-1, -2)
    if table is not None:
        table = table.to(q.dtype)
        index = index[:, None].expand(scores.shape)
        scores = scores + (q @ table.T).gather(-1, index)
    probs = (scores * scale + bias.to(q.dtype)).softmax(dim=-1)
    probs = dropout(probs, dropout_p, training=True)
    y = probs @ v
    if table is not None:
        per_distance = torch.zeros(*probs.shape[:-1], table.shape[0], dtype=probs.dtype,
                                   device=probs.device).scatter_add_(-1, index, probs)
        y = y + per_distance @ table
    return y
