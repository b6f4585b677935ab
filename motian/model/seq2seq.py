"""An encoder-decoder on the motian backbone, for MASS (Song, Tan, Qin, Lu & Liu 2019, "MASS:
Masked Sequence to Sequence Pre-training for Language Generation", arXiv:1905.02450).

`Seq2SeqLM` = the ordinary bidirectional `MotianModel` as encoder (named `backbone`, so
`motian finetune --model RUN/final` takes it like any head's backbone) + a `Decoder`: the same
embeddings / position schemes / attention code made causal, each block self-attention, then
cross-attention to the encoder output, then the FFN (Vaswani et al. 2017's decoder layer).
The decoder's output layer is tied to its input embeddings. Encoder and decoder embeddings are
separate tensors (the saved model stays one safetensors file without aliased tensors; MASS
shares them - a small difference at the cost of vocab x hidden parameters).

Generation (motian.serving.prefix_decoding) keeps the decoder's self-attention keys and values
in a `KVCache` and the cross-attention keys and values of the encoder output in a `Memory`,
computed once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.dropout import Dropout
from motian.model.heads import HEADS, ModelOutput
from motian.model.transformer import (
    Attention,
    FeedForward,
    KVCache,
    LayerCache,
    MotianModel,
    attention,
    init_weights,
)


@dataclass
class Memory:
    """The encoder output as every decoder layer reads it: per layer the cross-attention keys
    and values (B, heads, S, head_dim), and the additive padding mask (B, 1, 1, S) or None."""

    kv: list[tuple[Tensor, Tensor]]
    bias: Tensor | None

    def reorder(self, rows: Tensor) -> None:
        self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        self.bias = None if self.bias is None else self.bias[rows]


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries over the encoder output (no position term: the
    encoder output already carries its positions)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.q = nn.Linear(config.hidden, config.hidden)
        self.kv = nn.Linear(config.hidden, 2 * config.hidden)
        self.out = nn.Linear(config.hidden, config.hidden)

    def memory(self, encoded: Tensor) -> tuple[Tensor, Tensor]:
        """encoded (B, S, hidden) -> keys, values (B, heads, S, head_dim)."""
        c = self.config
        B, S, _ = encoded.shape
        k, v = self.kv(encoded).view(B, S, 2, c.heads, c.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
        c = self.config
        B, L, H = x.shape
        q = self.q(x).view(B, L, c.heads, c.head_dim).transpose(1, 2)  # (B, heads, L, d)
        mask = None if bias is None else bias.to(q.dtype)
        dropout_p = c.attention_dropout if self.training else 0.0
        y = attention(q, *kv, mask, False, c.head_dim ** -0.5, dropout_p)
        return self.out(y.transpose(1, 2).reshape(B, L, H))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention, FFN; Pre-LN or Post-LN as the encoder's `Block`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.cross = CrossAttention(config)
        self.cross_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, ctx, kv: tuple[Tensor, Tensor], bias: Tensor | None,
                cache: LayerCache | None = None) -> Tensor:
        """x (B, L, hidden) -> (B, L, hidden)."""
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attention_norm(x), ctx, None, cache))
            x = x + self.dropout(self.cross(self.cross_norm(x), kv, bias))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attention_norm(x + self.dropout(self.attention(x, ctx, None, cache)))
        x = self.cross_norm(x + self.dropout(self.cross(x, kv, bias)))
        return self.ffn_norm(x + self.ffn(x))


class Decoder(MotianModel):
    """`MotianModel` with a causal config and `DecoderBlock`s: its embeddings, position schemes
    and attention context (masks, biases, the KV cache) are the backbone's own code."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.replace(causal=True))
        self.blocks = nn.ModuleList(DecoderBlock(self.config) for _ in range(config.layers))
        init_weights(self.blocks, self.config)

    def forward(self, input_ids: Tensor, memory: Memory, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Decoder inputs (B, L) -> hidden states (B, L, hidden); with `cache`, the new tokens
        after the cached ones (positions continue from them)."""
        B, L = input_ids.shape
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=input_ids.device)[None]
        if cache is not None:
            position_ids = position_ids.expand(B, L)
        if self.config.position in ("absolute", "tupe") and \
                int(position_ids.max()) >= self.config.max_positions:
            raise UserError(f"decoder position {int(position_ids.max())} exceeds max_positions="
                            f"{self.config.max_positions} of '{self.config.position}' positions")
        x = self.embeddings(input_ids, None, position_ids)
        ctx = self._attention_context(attention_mask, None, position_ids, L, cache)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, memory.kv[i], memory.bias, None if cache is None
                      else cache.layers[i])
        return x if self.final_norm is None else self.final_norm(x)


class Seq2SeqLM(nn.Module):
    """Encoder-decoder language model (MASS). `forward` encodes `input_ids` and decodes
    `decoder_input_ids` (teacher forcing): `logits` (B, Ld, vocab), or (N, vocab) at the
    positions where `decoder_labels` (B, Ld) is not -100, with `loss` their mean
    cross-entropy. Pass `memory` (from `encode`) and `cache` to decode step by step."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.causal:
            raise UserError("Seq2SeqLM needs a bidirectional encoder config (causal: false); "
                            "the decoder is made causal by the model itself")
        self.config = config
        self.head_kwargs: dict = {}
        self.backbone = MotianModel(config)
        self.decoder = Decoder(config)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None,
               position_ids: Tensor | None = None) -> Memory:
        """Run the encoder once; every decoder layer's cross-attention keys and values."""
        h = self.backbone(input_ids, attention_mask, token_type_ids, position_ids)
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            zero = torch.zeros((), device=h.device)
            bias = torch.where(attention_mask.bool(), zero, float("-inf"))[:, None, None, :]
        return Memory([block.cross.memory(h) for block in self.decoder.blocks], bias)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                decoder_input_ids: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None,
                decoder_position_ids: Tensor | None = None,
                decoder_labels: Tensor | None = None, memory: Memory | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        if decoder_input_ids is None:
            raise UserError("Seq2SeqLM needs decoder_input_ids (the target shifted right)")
        if memory is None:
            if input_ids is None:
                raise UserError("Seq2SeqLM needs input_ids (the encoder input) or a memory")
            memory = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        h = self.decoder(decoder_input_ids, memory, decoder_attention_mask, decoder_position_ids,
                         cache)  # (B, Ld, hidden)
        keep = None
        if decoder_labels is not None:
            keep = decoder_labels != -100
            h = h[keep]  # (N, hidden): the output layer only where a loss is taken
        logits = F.linear(h, self.decoder.embeddings.word.weight)
        out = ModelOutput(logits=logits, hidden_states=h)
        if keep is not None:
            labels = decoder_labels[keep]
            out.loss = out.losses["mass"] = (F.cross_entropy(logits.float(), labels)
                                             if labels.numel() else logits.sum() * 0.0)
        return out


HEADS[Seq2SeqLM.__name__] = Seq2SeqLM  # from_pretrained rebuilds it by name
