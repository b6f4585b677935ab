"""Objectives: uncertainty weighting (Kendall et al. 2018) and fixed weights; the token-weighted
loss gives the same gradient however a batch is split into micro-batches (real model, real
batch from encoded People's Daily)."""

from __future__ import annotations

import math

import pytest
import torch

from motian.data.loader import LoaderConfig, PackedLoader
from motian.model import preset
from motian.train.objectives import (
    Pretrainer,
    TaskWeighting,
    build_model,
    predicted_tokens,
    task_names,
)
from motian.train.recipe import ObjectiveSpec


def test_uncertainty_weighting_is_exp_minus_s_times_loss_plus_half_s():
    w = TaskWeighting(["mlm", "pair"], ObjectiveSpec(weighting="uncertainty"))
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = {"mlm": torch.tensor(4.0), "pair": torch.tensor(0.7)}
    expected = math.exp(-0.5) * 4.0 + 0.25 + math.exp(1.0) * 0.7 - 0.5
    assert float(w(losses, 1.0).detach()) == pytest.approx(expected, rel=1e-6)
    assert w.weights() == pytest.approx({"mlm": math.exp(-0.5), "pair": math.exp(1.0)})
    # The optimum of s for a fixed loss L is s = log(2 L): a high-loss task is weighted down.
    s = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        (torch.exp(-s) * 4.0 + 0.5 * s).sum().backward()
        opt.step()
    assert float(s.detach()) == pytest.approx(math.log(8.0), abs=1e-3)


def test_fixed_weights_and_single_task_have_no_learned_parameter():
    w = TaskWeighting(["mlm", "pair"], ObjectiveSpec(weighting="fixed",
                                                     weights={"mlm": 1.0, "pair": 0.5}))
    assert w.log_vars is None
    total = w({"mlm": torch.tensor(2.0), "pair": torch.tensor(1.0)}, 1.0)
    assert float(total) == pytest.approx(2.5)
    assert TaskWeighting(["mlm"], ObjectiveSpec()).log_vars is None
    assert task_names(ObjectiveSpec(), "none") == ["mlm"]
    assert task_names(ObjectiveSpec(kind="causal"), "none") == ["lm"]


def _grads(pretrainer, batches, world_tokens):
    pretrainer.zero_grad()
    for b in batches:
        loss, _ = pretrainer(b, world_tokens, len(batches))
        loss.backward()
    return {n: p.grad.clone() for n, p in pretrainer.named_parameters() if p.grad is not None}


def test_split_batches_give_the_gradient_of_the_whole_batch(pd98_encoded):
    """Two micro-batches of 4 rows hold different numbers of masked tokens; weighting by the
    global count makes their summed gradient equal the gradient of the 8-row batch."""
    cfg = dict(seq_len=48, seed=3, pair_task="sop")
    whole = next(iter(PackedLoader(pd98_encoded, config=LoaderConfig(batch_size=8, **cfg))))
    halves = [{k: v[4 * i:4 * i + 4] if v.shape and v.shape[0] == 8 else v
               for k, v in whole.items()} for i in range(2)]
    # Re-derive the compact labels for each half from the whole batch.
    L = whole["input_ids"].shape[1]
    for i, h in enumerate(halves):
        keep = (whole["mlm_positions"] // L >= 4 * i) & (whole["mlm_positions"] // L < 4 * i + 4)
        h["mlm_positions"] = whole["mlm_positions"][keep] - 4 * i * L
        h["mlm_labels"] = whole["mlm_labels"][keep]
    assert predicted_tokens(halves[0]) != predicted_tokens(halves[1])
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=3100, hidden=32, heads=2, ffn=64, dropout=0.0,
                    attention_dropout=0.0)
    model = build_model(config, ObjectiveSpec(), "sop")
    pre = Pretrainer(model, TaskWeighting(["mlm", "pair"], ObjectiveSpec()))
    n = predicted_tokens(whole)
    g_whole = _grads(pre, [whole], n)
    g_split = _grads(pre, halves, n)
    assert g_whole.keys() == g_split.keys()
    for name in g_whole:
        torch.testing.assert_close(g_split[name], g_whole[name], rtol=1e-4, atol=1e-6)
    loss, stats = pre(whole, n, 1)
    assert stats["mlm_tokens"] == n and torch.isfinite(loss)
