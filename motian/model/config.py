"""`ModelConfig`: every architectural choice of a motian Transformer, and the named presets.

One dataclass describes encoders (BERT, the Motian recipe) and decoders (GPT-like, `causal=True`):
the model families of the field differ mostly in attention masks, position schemes and heads, so
they are values here rather than forks of the model code. Only *what is trained* lives here, plus
`checkpoint_activations`, which changes speed and memory but not the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

from motian.errors import UserError

Activation = Literal["gelu", "geglu"]
Norm = Literal["pre", "post"]
Pooling = Literal["cls", "mean"]
Position = Literal["absolute", "sinusoidal", "t5", "nezha", "deberta", "rope", "alibi", "tupe"]
AttentionKind = Literal["full", "sliding"]
GlobalAttention = Literal["none", "cls"]

POSITIONS: tuple[str, ...] = Position.__args__
# Schemes with no table indexed by absolute position: they run at lengths longer than trained
# (stage 2 at 512 after stage 1 at 128). Relative ones clip or bucket distances beyond their
# range; sinusoidal/RoPE are functions of the position, defined for every integer.
EXTRAPOLATING: frozenset[str] = frozenset({"sinusoidal", "t5", "nezha", "deberta", "rope", "alibi"})
# Schemes whose terms sparse_attention.py computes inside the band: DeBERTa's and TUPE's would
# need their own banded re-implementation (TUPE also has a table indexed by absolute position).
SLIDING_POSITIONS: tuple[str, ...] = ("absolute", "sinusoidal", "rope", "alibi", "t5", "nezha")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a motian Transformer (encoder or decoder)."""

    vocab_size: int = 21128  # bert-base-chinese vocabulary size
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072  # inner size of the feed-forward block (per branch for GEGLU)
    activation: Activation = "gelu"  # GELU (BERT) or GEGLU (Shazeer 2020, arXiv:2002.05202)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    norm: Norm = "post"  # post: BERT (Post-LN); pre: Pre-LN (Xiong et al. 2020, arXiv:2002.04745)
    causal: bool = False  # True: decoder (each token sees only the past)
    position: Position = "absolute"
    max_positions: int = 512  # size of the learned table (absolute, tupe)
    relative_buckets: int = 32  # t5: number of buckets
    relative_max_distance: int = 128  # t5: distances beyond this share the last bucket
    max_relative_position: int = 64  # nezha / deberta: distances are clipped to +-this
    rope_base: float = 10000.0
    type_vocab_size: int = 2  # segment A/B embeddings; 0 = none
    layer_norm_eps: float = 1e-12
    tie_word_embeddings: bool = True  # MLM / LM output layer shares the input embedding matrix
    cross_document_attention: bool = True  # False: tokens attend only within their document
    checkpoint_activations: bool = False  # recompute each block in backward (memory for time)
    initializer_range: float = 0.02  # BERT: weights ~ N(0, 0.02), biases 0, LayerNorm 1/0
    # What sequence heads (classification, pairs, multiple choice) read: [CLS] as BERT, or the
    # mean over real tokens, which an MLM-only pretraining (no pair task) trains where [CLS]
    # stays untrained (docs/finetune.md measures it). The pretraining pair task always reads [CLS].
    classifier_pooling: Pooling = "cls"
    # Longformer attention (Beltagy et al. 2020, arXiv:2004.05150; model/sparse_attention.py):
    # "sliding" lets each token see `attention_window` tokens per side (every
    # `attention_dilation`-th one; an int or one per head), plus the global tokens, in O(L * w)
    # memory. `global_attention` "cls": position-0 tokens ([CLS]) see and are seen by all.
    attention: AttentionKind = "full"
    attention_window: int = 256
    attention_dilation: int | list[int] = 1
    global_attention: GlobalAttention = "none"
    # Structured pruning (motian/pruning.py) leaves layers of different widths. `layer_heads`:
    # per layer, the heads it kept, as indices into the `heads` of the unpruned model (per-head
    # position biases - t5, alibi, tupe - follow their head); `layer_ffn`: per layer, the FFN
    # width. None (the default): every layer has `heads` heads and `ffn` units.
    layer_heads: list[list[int]] | None = None
    layer_ffn: list[int] | None = None
    # BERT's embeddings end in a LayerNorm (the default). GPT-2's do not: its embeddings go
    # straight into the first Pre-LN block, whose own LayerNorm normalises them. False is what
    # a decoder needs to be exported as a native GPT2LMHeadModel (motian.model.hf, recipe
    # gpt2-demo); older checkpoints, without the field, keep their LayerNorm.
    embedding_norm: bool = True

    def __post_init__(self) -> None:
        self._check_choice("activation", Activation.__args__)
        self._check_choice("norm", Norm.__args__)
        self._check_choice("position", POSITIONS)
        self._check_choice("classifier_pooling", Pooling.__args__)
        if self.hidden % self.heads:
            raise UserError(f"model config: hidden ({self.hidden}) must be divisible by heads "
                            f"({self.heads}); choose e.g. heads={_divisor_near(self.hidden, self.heads)}")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"model config: rope needs an even head size, got {self.head_dim}")
        for name in ("vocab_size", "hidden", "layers", "heads", "ffn", "max_positions",
                     "relative_buckets", "max_relative_position"):
            if getattr(self, name) < 1:
                raise UserError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise UserError("model config: dropout and attention_dropout must be in [0, 1)")
        self._check_choice("attention", AttentionKind.__args__)
        self._check_choice("global_attention", GlobalAttention.__args__)
        if self.attention == "sliding":
            self._check_sliding()
        self._check_layer_sizes()

    def _check_layer_sizes(self) -> None:
        """Refuse per-layer overrides that do not describe `layers` layers."""
        for name in ("layer_heads", "layer_ffn"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list | tuple)
                                      or len(value) != self.layers):
                raise UserError(f"model config: {name} must list one entry per layer "
                                f"(layers={self.layers}), got {value!r}")
        for i, kept in enumerate(self.layer_heads or []):
            if (not isinstance(kept, list | tuple) or not kept or len(set(kept)) != len(kept)
                    or any(not isinstance(h, int) or not 0 <= h < self.heads for h in kept)):
                raise UserError(f"model config: layer_heads[{i}] must be distinct head indices "
                                f"in 0..{self.heads - 1} (at least one), got {kept!r}")
        for i, width in enumerate(self.layer_ffn or []):
            if not isinstance(width, int) or width < 1:
                raise UserError(f"model config: layer_ffn[{i}] must be an integer >= 1, got "
                                f"{width!r}")
        if self.layer_heads is not None and self.attention != "full":
            raise UserError("model config: layer_heads (pruned heads) needs attention='full'")

    def _check_sliding(self) -> None:
        """Refuse Longformer settings that cannot work, naming the option to change."""
        if self.attention_window < 1:
            raise UserError(f"model config: attention_window must be >= 1 (tokens seen on each "
                            f"side), got {self.attention_window}")
        dilation = self.attention_dilation
        values = list(dilation) if isinstance(dilation, list | tuple) else [dilation]
        if isinstance(dilation, list | tuple) and len(values) != self.heads:
            raise UserError(f"model config: attention_dilation has {len(values)} values but the "
                            f"model has heads={self.heads}; give one per head or one int")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in values):
            raise UserError(f"model config: attention_dilation must be integers >= 1, got "
                            f"{dilation}")
        if self.position not in SLIDING_POSITIONS:
            raise UserError(f"model config: attention='sliding' does not support position="
                            f"{self.position!r}; use one of {', '.join(SLIDING_POSITIONS)} or "
                            "attention='full'")

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, name) not in allowed:
            raise UserError(f"model config: {name}={getattr(self, name)!r} is not one of "
                            f"{', '.join(allowed)}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kept_heads(self, layer: int) -> list[int] | None:
        """The heads layer `layer` kept after pruning (indices into `heads`); None: all."""
        return None if self.layer_heads is None else list(self.layer_heads[layer])

    def ffn_width(self, layer: int) -> int:
        """The FFN width of layer `layer`: `layer_ffn[layer]` after pruning, else `ffn`."""
        return self.ffn if self.layer_ffn is None else self.layer_ffn[layer]

    @property
    def extrapolates(self) -> bool:
        """True if the model runs at sequence lengths beyond `max_positions`."""
        return self.position in EXTRAPOLATING

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model config: unknown field(s) {', '.join(unknown)}; "
                            f"known fields are {', '.join(sorted(known))}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: model config not found") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


# Shapes: tiny runs every CPU test; base is BERT-base; motian-1b follows the ~1B model of the
# Motian report (Pre-LN, relative positions): 24 layers x 2048 hidden x 32 heads x 8192 FFN is
# 1.21B parameters in the blocks + 43M in the embeddings at vocab 21128 = 1.25B
# (`motian.model.count_parameters(MaskedLM(preset("motian-1b")))`, see docs/model.md).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=256, max_positions=128),
    "small": dict(hidden=512, layers=4, heads=8, ffn=2048),
    "base": dict(hidden=768, layers=12, heads=12, ffn=3072),
    "large": dict(hidden=1024, layers=24, heads=16, ffn=4096),
    "motian-1b": dict(hidden=2048, layers=24, heads=32, ffn=8192, norm="pre", position="t5",
                      dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-6),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset (tiny, small, base, large, motian-1b) with `overrides` applied."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
