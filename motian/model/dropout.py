"""Dropout whose random numbers are cheap on CPU: `dropout(x, p, training)` and `Dropout`.

Why a hand-written dropout: on CPU, `torch.nn.functional.dropout` draws one Bernoulli sample
per element from torch's serial generator and then makes three passes (noise, divide,
multiply). Measured on this project's 2-core AMD EPYC (torch 2.13, `benchmarks/train_step.py`
shape), that is ~90 M elements/s, and a BERT step at hidden 256 drops ~17 M elements (embeddings,
attention probabilities, two residual branches per layer): dropout alone took ~20-30% of the
step. Here one 64-bit draw feeds four elements: `random_()` fills int64 words, their low 15 bits
per 16-bit lane are uniform, and an element is kept when its lane is >= round(p * 2^15). Masks are
saved as bool (1 byte/element; `F.dropout` on CPU keeps a float noise tensor, 4 bytes).

The drop probability is p rounded to a multiple of 2^-15 (0.1 -> 0.100006) and the kept values
are scaled by exactly 1 / (1 - that), so the expectation is unchanged. On GPU, and inside
`torch.compile` (whose generated kernels fuse their own RNG), the stock `F.dropout` is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 15  # uniform levels per 16-bit lane (the top bit of each lane is cleared)
_LOW_15_BITS_PER_LANE = 0x7FFF7FFF7FFF7FFF


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device) -> tuple[Tensor, float]:
    """A bool tensor of `shape`, True with probability 1 - p (to 2^-15), and the scale
    1 / (1 - p_effective) for the kept values."""
    n = 1
    for size in shape:
        n *= size
    # int64 random_() yields [0, 2^63): the top lane's sign bit is always 0, so every lane is
    # cut to its low 15 bits, which are uniform, instead of using 3 of every 4 lanes.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = words.bitwise_and_(_LOW_15_BITS_PER_LANE).view(torch.int16)[:n]  # (n,) in [0, 2^15)
    dropped = round(p * _LEVELS)
    return (lanes >= dropped).view(shape), _LEVELS / (_LEVELS - dropped)


class _CheapDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    return _CheapDropout.apply(x, p)


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout` that calls `dropout` (cheap random numbers on CPU)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
