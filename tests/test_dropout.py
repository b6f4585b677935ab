"""motian's CPU dropout: right rate and scale, the same mask forward and backward, seeded."""

from __future__ import annotations

import pytest
import torch

from motian.model.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_scale_and_mean(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x, p, training=True)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=0.005)  # 400k draws: 5 sigma is < 0.004
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), atol=1e-3, rtol=1e-3)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation unchanged


def test_every_lane_of_the_random_words_is_used_uniformly():
    """Each int64 word feeds 4 elements; a biased lane (the top one, whose sign bit random_()
    never sets) would show as one position in 4 dropped at another rate."""
    torch.manual_seed(1)
    keep, scale = keep_mask((100_000, 4), 0.5, torch.device("cpu"))
    per_lane = keep.float().mean(dim=0)
    torch.testing.assert_close(per_lane, torch.full((4,), 0.5), atol=0.01, rtol=0)
    assert scale == 2.0


def test_backward_uses_the_forward_mask_and_seed_reproduces():
    x = torch.randn(3, 50, requires_grad=True)
    torch.manual_seed(2)
    y = dropout(x, 0.3, training=True)
    y.sum().backward()
    kept = y != 0
    torch.testing.assert_close(x.grad, kept.float() / (1 - 0.3), atol=1e-4, rtol=1e-4)
    torch.manual_seed(2)
    torch.testing.assert_close(dropout(x, 0.3, training=True), y)


def test_eval_and_zero_p_are_identity_and_bad_p_is_refused():
    x = torch.randn(4, 4)
    layer = Dropout(0.2).eval()
    assert layer(x) is x and dropout(x, 0.0, training=True) is x
    with pytest.raises(ValueError, match="0, 1"):
        Dropout(1.0)
