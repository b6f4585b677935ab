"""LAMB against a numpy reference written out by hand, AdamW, parameter groups, and LAMB
training the real tiny motian model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from motian.errors import UserError
from motian.model import MaskedLM, preset
from motian.train import optim
from motian.train.optim import Lamb, build_optimizer, param_groups

# Two parameter tensors of very different norms, and the targets of a quadratic loss
# L = sum_i 0.5 * sum(scale_i * (w_i - target_i)^2), whose gradient is scale_i * (w_i - target_i).
W0 = [np.array([3.0, -4.0, 12.0]), np.array([[0.01, -0.02], [0.03, 0.005]])]
TARGETS = [np.array([1.0, 1.0, 1.0]), np.array([[0.5, 0.5], [-0.5, 0.0]])]
SCALES = [0.7, 2.0]
# Mixed tensors for the always-on normalisations: the two above, a 0-d-like single element, and
# a tensor whose loss term has scale 0, so its gradient is exactly zero on every step (it must
# stay zero under "block" and "global", not become NaN).
W0_MIXED = [*W0, np.array([0.25]), np.array([[1.0, -2.0, 0.5]])]
TARGETS_MIXED = [*TARGETS, np.array([-3.0]), np.array([[0.0, 0.0, 0.0]])]
SCALES_MIXED = [*SCALES, 5.0, 0.0]


def lamb_reference(lr, b1, b2, eps, wd, max_norm, steps, prenorm=True, bias_correction=True,
                   trust_clip=None, w0=W0, normalization=None, targets=TARGETS,
                   scales=SCALES):
    """LAMB (You et al. 2020, Algorithm 2) with a gradient normalisation, in numpy float64, one
    line per equation. `normalization`: "clip" (NVIDIA's global pre-normalisation,
    g / max(1, ||G|| / max_norm)), "block" (LANS: g / ||g|| per tensor, always), "global"
    (g / ||G||, always) or "none"; None means "clip" if `prenorm` else "none". Returns the
    weights after each step and whether the gradient was rescaled at each step."""
    if normalization is None:
        normalization = "clip" if prenorm else "none"
    w = [x.copy() for x in w0]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    history, clipped = [], []
    for t in range(1, steps + 1):
        g = [s * (wi - ti) for wi, ti, s in zip(w, targets, scales)]
        global_norm = np.sqrt(sum(np.sum(gi * gi) for gi in g))
        if normalization == "clip":
            clipped.append(bool(global_norm > max_norm))
            if clipped[-1]:
                g = [gi / (global_norm / max_norm) for gi in g]
        elif normalization == "global":
            clipped.append(bool(global_norm > 0))
            if global_norm > 0:
                g = [gi / global_norm for gi in g]
        elif normalization == "block":
            block_norms = [np.sqrt(np.sum(gi * gi)) for gi in g]
            clipped.append(any(n > 0 for n in block_norms))
            g = [gi / n if n > 0 else gi for gi, n in zip(g, block_norms)]
        else:
            clipped.append(False)
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            m_hat = m[i] / (1 - b1 ** t) if bias_correction else m[i]
            v_hat = v[i] / (1 - b2 ** t) if bias_correction else v[i]
            update = m_hat / (np.sqrt(v_hat) + eps) + wd * w[i]
            w_norm = np.sqrt(np.sum(w[i] ** 2))
            u_norm = np.sqrt(np.sum(update ** 2))
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if trust_clip is not None:
                ratio = min(ratio, trust_clip)
            w[i] = w[i] - lr * ratio * update
        history.append([x.copy() for x in w])
    return history, clipped


def run_lamb(steps, w0=W0, targets=TARGETS, scales=SCALES, loss_scale=lambda step: 1.0,
             **kwargs):
    """`Lamb` on the quadratic loss; the loss of step `k` (from 0) is multiplied by
    `loss_scale(k)`. Returns the weights after each step and the optimiser."""
    params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in w0]
    opt = Lamb(params, **kwargs)
    history = []
    for k in range(steps):
        opt.zero_grad()
        loss = sum(0.5 * s * ((p - torch.tensor(t)) ** 2).sum()
                   for p, t, s in zip(params, targets, scales))
        (loss * loss_scale(k)).backward()
        opt.step()
        history.append([p.detach().numpy().copy() for p in params])
    return history, opt


@pytest.mark.parametrize("max_norm,expect_clip", [(100.0, False), (1.0, True)])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("batch_elements", [1 << 18, 4])  # both tensors in one call / one each
def test_lamb_matches_hand_reference(max_norm, expect_clip, bias_correction, batch_elements,
                                     monkeypatch):
    monkeypatch.setattr(optim, "CPU_BATCH_ELEMENTS", batch_elements)
    settings = dict(lr=0.05, b1=0.9, b2=0.99, eps=1e-6, wd=0.1)
    ref, clipped = lamb_reference(**settings, max_norm=max_norm, steps=3,
                                  bias_correction=bias_correction)
    assert all(c == expect_clip for c in clipped)  # the path under test is really taken
    got, opt = run_lamb(3, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
                        max_grad_norm=max_norm, bias_correction=bias_correction)
    for step_ref, step_got in zip(ref, got):
        for a, b in zip(step_ref, step_got):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    # The two tensors moved by amounts proportional to their own norms (the point of LAMB):
    moved = [np.linalg.norm(got[0][i] - W0[i]) / np.linalg.norm(W0[i]) for i in range(2)]
    assert moved[0] == pytest.approx(moved[1], rel=0.5)
    assert opt.last_grad_norm is not None and opt.last_grad_norm.ndim == 0


def test_lamb_without_prenormalisation_and_with_trust_clip():
    ref, clipped = lamb_reference(0.05, 0.9, 0.999, 1e-6, 0.01, 1.0, 3, prenorm=False,
                                  trust_clip=2.0)
    assert not any(clipped)
    got, _ = run_lamb(3, lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                      grad_normalization="none", trust_clip=2.0)
    # Without the clip the big tensor's ratio is ~12: the clip must bind for this to match.
    unclipped, _ = lamb_reference(0.05, 0.9, 0.999, 1e-6, 0.01, 1.0, 3, prenorm=False)
    assert not np.allclose(unclipped[-1][0], ref[-1][0])
    for a, b in zip(ref[-1], got[-1]):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("normalization", ["block", "global", "clip", "none"])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("batch_elements", [1 << 18, 4])
def test_always_on_normalisations_match_hand_reference(normalization, bias_correction,
                                                       batch_elements, monkeypatch):
    # Four tensors of different shapes and gradient scales, one with an all-zero gradient on
    # every step, 5 steps (bias corrections still far from 1 with b2 = 0.99).
    monkeypatch.setattr(optim, "CPU_BATCH_ELEMENTS", batch_elements)
    mixed = dict(w0=W0_MIXED, targets=TARGETS_MIXED, scales=SCALES_MIXED)
    ref, rescaled = lamb_reference(0.05, 0.9, 0.99, 1e-6, 0.1, 1.0, 5,
                                   bias_correction=bias_correction,
                                   normalization=normalization, **mixed)
    # The path under test is really taken: gradients are rescaled on every step (for "clip",
    # the global norm is above 1 here), never for "none".
    assert all(rescaled) == (normalization != "none") and any(rescaled) == all(rescaled)
    got, opt = run_lamb(5, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
                        bias_correction=bias_correction, grad_normalization=normalization,
                        **mixed)
    for step_ref, step_got in zip(ref, got):
        for a, b in zip(step_ref, step_got):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    zero = opt.param_groups[0]["params"][3]
    assert torch.equal(opt.state[zero]["exp_avg"], torch.zeros_like(zero))  # 0 stayed 0
    assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])
    # last_grad_norm is the raw gradient's global norm, before any normalisation.
    w_before = ref[-2]
    raw = [s * (w - t) for w, t, s in zip(w_before, TARGETS_MIXED, SCALES_MIXED)]
    assert float(opt.last_grad_norm) == pytest.approx(
        np.sqrt(sum(np.sum(g * g) for g in raw)), rel=1e-12)


def test_block_normalisation_is_not_the_clip():
    # Small gradients (global norm ~0.46 < max_grad_norm 1): "clip" must leave them alone, so
    # its moments and weights are exactly those of raw gradients; "block" rescales every
    # tensor to norm 1, so its moments differ and so do its steps. This is why the old
    # pre-normalisation was a no-op after the loop's own clipping to 1.
    small = dict(targets=TARGETS, scales=[0.01, 0.5])
    _, rescaled = lamb_reference(0.05, 0.9, 0.999, 1e-6, 0.01, 1.0, 3, **small)
    assert not any(rescaled)  # below the clip on every step
    runs = {mode: run_lamb(3, lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                           grad_normalization=mode, **small)
            for mode in ("clip", "none", "block")}

    def moments(opt):
        return [(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
                for p in opt.param_groups[0]["params"]]

    for (m_clip, v_clip), (m_raw, v_raw), (m_block, v_block) in zip(
            *(moments(runs[k][1]) for k in ("clip", "none", "block"))):
        assert torch.equal(m_clip, m_raw) and torch.equal(v_clip, v_raw)
        assert not torch.allclose(m_block, m_raw) and not torch.allclose(v_block, v_raw)
    for w_clip, w_raw, w_block in zip(*(runs[k][0][-1] for k in ("clip", "none", "block"))):
        assert np.array_equal(w_clip, w_raw)
        assert not np.allclose(w_block, w_raw, rtol=1e-6, atol=0)


def test_block_update_depends_only_on_the_gradient_direction():
    # Scaling the loss by 1000 (or by a different factor on every step, which Adam's own
    # m / sqrt(v) does not cancel) leaves the "block" trajectory unchanged: only each
    # tensor's gradient direction reaches the moments.
    settings = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                    w0=W0_MIXED, targets=TARGETS_MIXED, scales=SCALES_MIXED)
    varying = [1.0, 1000.0, 1e-3, 50.0, 3.0]
    base, _ = run_lamb(5, grad_normalization="block", **settings)
    for scale in (lambda k: 1000.0, lambda k: varying[k]):
        scaled, _ = run_lamb(5, grad_normalization="block", loss_scale=scale, **settings)
        for step_base, step_scaled in zip(base, scaled):
            for a, b in zip(step_base, step_scaled):
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
    # Without normalisation the same varying scales change the result.
    raw, _ = run_lamb(5, grad_normalization="none", **settings)
    raw_scaled, _ = run_lamb(5, grad_normalization="none", loss_scale=lambda k: varying[k],
                             **settings)
    assert not np.allclose(raw[-1][0], raw_scaled[-1][0], rtol=1e-6, atol=0)


def test_bad_grad_normalization_is_refused():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unknown grad_normalization 'layer'.*block"):
        Lamb(model.parameters(), grad_normalization="layer")
    with pytest.raises(UserError, match="unknown grad_normalization 'layer'; choose one of "
                                        "clip, block, global, none"):
        build_optimizer(model, "lamb", lr=0.01, grad_normalization="layer")
    with pytest.raises(UserError, match="'block' applies to the lamb optimizer only"):
        build_optimizer(model, "adamw", lr=0.01, grad_normalization="block")
    opt = build_optimizer(model, "lamb", lr=0.01, grad_normalization="global")
    assert opt.grad_normalization == "global"


def test_recipe_grad_normalization_reaches_the_optimizer(tmp_path, pd98_encoded):
    # Through the real loop: a recipe's optim.grad_normalization changes the trained weights
    # ("clip" is a no-op after the loop's clip_norm 1, "block" is not), and adamw with "block"
    # is refused with the message of build_optimizer.
    from motian.pretraining import pretrain_recipe
    from motian.train.recipe import RunSettings, load_recipe
    from tests.pretrain_helpers import final_weights, max_difference, write_recipe

    data = pd98_encoded
    cpu = RunSettings(device="cpu", threads=1, progress=False)
    weights = {}
    for mode in ("clip", "block"):
        base = load_recipe(write_recipe(tmp_path, steps=3, eval_every=0, checkpoint_every=0,
                                        pair_task="none"))
        recipe = replace(base, optim=replace(base.optim, grad_normalization=mode))
        pretrain_recipe(recipe, cpu, data, tmp_path / mode)
        weights[mode] = final_weights(tmp_path / mode)
    assert max_difference(weights["clip"], weights["block"]) > 1e-4
    recipe = replace(recipe, optim=replace(recipe.optim, name="adamw"))
    with pytest.raises(UserError, match="applies to the lamb optimizer only"):
        pretrain_recipe(recipe, cpu, data, tmp_path / "adamw")


def test_always_adapt_false_skips_the_ratio_where_there_is_no_decay():
    # With weight decay 0 and always_adapt=False the step is Adam's (ratio 1); with the
    # default always_adapt=True this tensor (norm 13) would move ~13x further.
    big = [W0[0]]
    params = [torch.nn.Parameter(torch.tensor(big[0]))]
    opt = Lamb(params, lr=0.05, weight_decay=0.0, always_adapt=False,
               grad_normalization="none")
    params[0].grad = torch.tensor(SCALES[0] * (big[0] - TARGETS[0]))
    opt.step()
    g = SCALES[0] * (big[0] - TARGETS[0])
    adam_step = (0.1 * g / 0.1) / (np.sqrt(0.001 * g * g / 0.001) + 1e-6)  # m^ / (sqrt(v^) + eps)
    np.testing.assert_allclose(params[0].detach().numpy(), big[0] - 0.05 * adam_step, rtol=1e-12)


def test_zero_norm_parameter_gets_trust_ratio_one():
    w0 = [np.zeros(3), W0[1]]  # a zero-initialised bias-like tensor
    ref, _ = lamb_reference(0.05, 0.9, 0.999, 1e-6, 0.1, 1.0, 2, w0=w0)
    got, _ = run_lamb(2, w0=w0, lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    for a, b in zip(ref[-1], got[-1]):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    # First step from w = 0: ratio 1, so w1 = -lr * sign(g) elementwise (Adam's first step).
    first, _ = run_lamb(1, w0=w0, lr=0.05, betas=(0.9, 0.999), eps=0.0, weight_decay=0.1)
    np.testing.assert_allclose(first[0][0], -0.05 * np.sign(-TARGETS[0]), rtol=1e-12)


def test_zero_gradient_and_zero_decay_leave_the_parameter_unchanged():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = Lamb([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_parameter_without_gradient_is_skipped_and_state_round_trips():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(2))
    opt = Lamb([a, b], lr=0.1)
    (a.sum() * 2).backward()
    opt.step()
    assert b not in opt.state and opt.state[a]["step"] == 1
    twin = Lamb([torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))], lr=0.1)
    twin.load_state_dict(opt.state_dict())
    assert torch.equal(twin.state[twin.param_groups[0]["params"][0]]["exp_avg"],
                       opt.state[a]["exp_avg"])


def test_param_groups_exclude_biases_and_norm_weights():
    model = MaskedLM(preset("tiny", vocab_size=100, norm="pre"))
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert any(n.endswith("attention_norm.weight") for n in no_decay)
    assert any("final_norm" in n for n in no_decay)
    assert all(not n.endswith(".bias") for n in decay)
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay)
    assert any("word" in n for n in decay)  # embeddings are decayed, as in BERT
    assert decay | no_decay == set(names.values()) and not decay & no_decay


def test_adamw_path_is_torch_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, "adamw", lr=0.01, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=0.01, eps=1e-6, weight_decay=0.1)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(3):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert isinstance(build_optimizer(model, "lamb", lr=0.01), Lamb)
    with pytest.raises(UserError, match="unknown optimizer 'sgd'"):
        build_optimizer(model, "sgd", lr=0.01)


def test_lamb_trains_the_tiny_model():
    torch.manual_seed(0)
    model = MaskedLM(preset("tiny", vocab_size=200, dropout=0.0, attention_dropout=0.0))
    ids = torch.randint(5, 200, (8, 32))
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape) < 0.3
    labels[masked] = ids[masked]
    ids = ids.masked_fill(masked, 4)
    opt = build_optimizer(model, "lamb", lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
