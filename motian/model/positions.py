"""Position schemes: how a motian Transformer knows where each token is.

Each scheme is one value of `ModelConfig.position`. They enter the model at one of three places:

- added to the token embeddings: learned `absolute` (BERT) and `sinusoidal` (Vaswani et al. 2017);
- rotating queries and keys before attention: `rope` (Su et al. 2021, arXiv:2104.09864);
- extra attention-score terms, computed here as a bias of shape (B|1, heads, L, L) and added to
  the scores inside `scaled_dot_product_attention`: `t5` bucketed bias (Raffel et al. 2020,
  arXiv:1910.10683), `alibi` (Press et al. 2022, arXiv:2108.12409), `tupe` untied
  position-position attention (Ke et al. 2021, arXiv:2006.15595) and the content<->position terms
  of `deberta` (He et al. 2021, arXiv:2006.03654). `nezha` (Wei et al. 2019, arXiv:1909.00204)
  also adds a relative vector to the *values*, which needs the attention probabilities: see
  `nezha_attention`.

Relative distances come from `position_ids` (B|1, L), so when the loader restarts positions at
every packed document, distances are measured within the document. No tables are stored as
buffers: sinusoid, rotary and slope tables are cheap functions of the positions, computed in
fp32 in `forward`, so they never go stale after a dtype/device move or meta-device init.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from motian.model.config import ModelConfig
from motian.model.dropout import dropout


def sinusoid(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Vaswani et al. sinusoids: (...,) integer positions -> (..., dim) with sin/cos interleaved."""
    angles = sinusoid_angles(positions, dim, base)  # (..., dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim]


def sinusoid_angles(positions: Tensor, dim: int, base: float) -> Tensor:
    """(...,) positions -> (..., ceil(dim/2)) angles pos * base^(-2k/dim), in fp32."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device,
                                      dtype=torch.float32) / dim)
    return positions.float()[..., None] * inv_freq


def relative_distance(position_ids: Tensor, key_position_ids: Tensor | None = None) -> Tensor:
    """(B|1, L) positions -> (B|1, L, L) signed distance key minus query: rel[b, i, j] = p_j - p_i.
    With `key_position_ids` (B, T) the keys are other tokens than the queries (a KV cache adds
    the earlier ones): (B, L, T)."""
    keys = position_ids if key_position_ids is None else key_position_ids
    return keys[:, None, :] - position_ids[:, :, None]


# --- RoPE -------------------------------------------------------------------------------------

def rotary_tables(position_ids: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B|1, 1, L, head_dim) for `apply_rotary` (rotate-half layout)."""
    angles = sinusoid_angles(position_ids, head_dim, base)  # (B|1, L, d/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B|1, 1, L, d)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, L, d) by position: pairs (x_k, x_{k+d/2}) turn by angle pos * f_k, so
    q_i . k_j depends only on i - j (RoFormer)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# --- T5 bucketed relative bias -----------------------------------------------------------------

def t5_buckets(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Map signed distances (key - query) to buckets: exact for small distances, log-spaced up to
    `max_distance`, one shared bucket beyond it (so any length runs). Bidirectional models use half
    the buckets for each direction; causal ones see only the past."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = (-rel).clamp(min=0)  # distance into the past
    max_exact = max(1, num_buckets // 2)
    log_ratio = torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(rel < max_exact, rel, large)


class T5Bias(nn.Module):
    """One learned scalar per (bucket, head), shared by all layers as in T5."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.relative_buckets, config.heads)

    def forward(self, position_ids: Tensor, key_position_ids: Tensor | None = None) -> Tensor:
        c = self.config
        buckets = t5_buckets(relative_distance(position_ids, key_position_ids), not c.causal,
                             c.relative_buckets, c.relative_max_distance)  # (B|1, L, L or T)
        return self.embedding(buckets).permute(0, 3, 1, 2)  # (B|1, heads, L, L)


# --- ALiBi -------------------------------------------------------------------------------------

def alibi_slopes(heads: int) -> Tensor:
    """Geometric slopes 2^(-8/n), 2^(-16/n), ...; for n not a power of two, the ALiBi paper's
    interpolation: slopes of the next lower power of two, then every other one of the double."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    low = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(low)
    if low < heads:
        slopes += power_of_two(2 * low)[0::2][: heads - low]
    return torch.tensor(slopes)


def alibi_bias(position_ids: Tensor, heads: int, key_position_ids: Tensor | None = None
               ) -> Tensor:
    """-slope * |distance| (B|1, heads, L, L or T); no parameters. For a causal model the future
    is masked anyway, so the symmetric form equals ALiBi's causal one on the visible part."""
    dist = relative_distance(position_ids, key_position_ids).abs().float()[:, None]
    return -alibi_slopes(heads).to(dist.device)[None, :, None, None] * dist


# --- TUPE --------------------------------------------------------------------------------------

class TupeBias(nn.Module):
    """TUPE's untied positional attention (Ke et al. 2021): positions are not added to the words;
    instead each head gets a position-position term (p_i U_q)(p_j U_k)^T / sqrt(2d), computed once
    and shared by all layers. [CLS] is untied from positions: row and column of a position-0
    token are replaced by two learned scalars per head (theta_cls->others, theta_others->cls).
    The content term is scaled by 1/sqrt(2d) as well (see `Attention`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.max_positions, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.cls_to_others = nn.Parameter(torch.zeros(config.heads))
        self.others_to_cls = nn.Parameter(torch.zeros(config.heads))

    def forward(self, position_ids: Tensor) -> Tensor:
        c = self.config
        p = self.norm(self.embedding(position_ids))  # (B|1, L, hidden)
        n, L = p.shape[:2]
        pq = self.query(p).view(n, L, c.heads, c.head_dim).transpose(1, 2)  # (B|1, h, L, d)
        pk = self.key(p).view(n, L, c.heads, c.head_dim).transpose(1, 2)
        bias = pq @ pk.transpose(-1, -2) / math.sqrt(2 * c.head_dim)  # (B|1, h, L, L)
        is_cls = (position_ids == 0)[:, None]  # (B|1, 1, L)
        others = self.others_to_cls[None, :, None, None].to(bias.dtype)
        bias = torch.where(is_cls[..., None, :], others, bias)  # column j = [CLS]
        first = self.cls_to_others[None, :, None, None].to(bias.dtype)
        return torch.where(is_cls[..., :, None], first, bias)  # row i = [CLS] (wins at (0, 0))


# --- NEZHA functional relative -----------------------------------------------------------------

def nezha_index(position_ids: Tensor, max_relative: int,
                key_position_ids: Tensor | None = None) -> Tensor:
    """(B|1, L, L or T) row into the (2K+1, d) table: clip(p_j - p_i, -K, K) + K."""
    rel = relative_distance(position_ids, key_position_ids)
    return rel.clamp(-max_relative, max_relative) + max_relative


def nezha_table(max_relative: int, head_dim: int, device: torch.device) -> Tensor:
    """NEZHA's fixed sinusoid of the clipped relative distance, (2K+1, head_dim)."""
    return sinusoid(torch.arange(-max_relative, max_relative + 1, device=device), head_dim)


def nezha_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, index: Tensor,
                    table: Tensor, dropout_p: float) -> Tensor:
    """NEZHA attention: s_ij = q_i . (k_j + a_ij) / sqrt(d), z_i = sum_j p_ij (v_j + a_ij).

    The key-side term is a bias SDPA could take, but the value-side term needs the probabilities
    p_ij themselves, which SDPA never returns; so NEZHA uses this explicit attention, which keeps
    the (B, h, L, L) probabilities in memory (no flash kernel). a_ij takes only 2K+1 values, so
    instead of an (L, L, d) tensor we score q against the table, (B, h, L, 2K+1), gather by
    distance, and for values sum the probabilities per distance bucket before one small matmul.
    q, k, v: (B, h, L, d); mask: additive (B|1, 1|h, L, L); index: (B|1, L, L).
    """
    table = table.to(q.dtype)
    index = index[:, None].expand(q.shape[0], q.shape[1], -1, -1)  # (B, h, L, L)
    scores = q @ k.transpose(-1, -2) + (q @ table.T).gather(-1, index)
    scores = scores / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    probs = dropout(scores.softmax(dim=-1), dropout_p, training=True)  # (B, h, L, L)
    per_distance = torch.zeros(*probs.shape[:-1], table.shape[0], dtype=probs.dtype,
                               device=probs.device).scatter_add_(-1, index, probs)
    return probs @ v + per_distance @ table  # (B, h, L, d)


# --- DeBERTa disentangled attention ------------------------------------------------------------

def deberta_index(position_ids: Tensor, span: int) -> Tensor:
    """delta(i, j) of DeBERTa: clip(p_i - p_j, -span, span - 1) + span, in [0, 2*span)."""
    return (-relative_distance(position_ids)).clamp(-span, span - 1) + span


def deberta_bias(q: Tensor, k: Tensor, rel_q: Tensor, rel_k: Tensor, index: Tensor) -> Tensor:
    """Content-to-position plus position-to-content scores (B, h, L, L), unscaled.

    c2p_ij = q_i . Kr[delta(i, j)], p2c_ij = k_j . Qr[delta(j, i)], with Qr, Kr the shared
    relative embeddings projected by this layer's own query/key weights (DeBERTa-v2's
    share_att_key). Like NEZHA, scoring against the 2*span table and gathering avoids an
    (L, L, d) tensor. q, k: (B, h, L, d); rel_q, rel_k: (h, 2*span, d); index: (B|1, L, L).
    """
    index = index[:, None].expand(q.shape[0], q.shape[1], -1, -1)  # (B, h, L, L)
    c2p = (q @ rel_k.transpose(-1, -2)).gather(-1, index)
    # delta(j, i) at [i, j] is index[j, i]: gather rows of k, then transpose back.
    p2c = (k @ rel_q.transpose(-1, -2)).gather(-1, index).transpose(-1, -2)
    return c2p + p2c
