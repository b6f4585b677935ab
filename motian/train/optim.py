"""Optimisers for pretraining: LAMB written for this project, AdamW from torch, and the
parameter groups both use (no weight decay for biases, norm weights and other 1-D parameters).

Why a hand-written LAMB: torch ships none, apex's fused one needs a CUDA build, and the
large-batch details the Motian recipe relies on (gradient pre-normalisation, global or per
tensor, bias correction, the trust-ratio conventions) differ between the third-party versions.
This one is small, tested against a numpy reference written out by hand (tests/test_optim.py),
works on CPU and GPU alike, and never syncs with the host inside `step` (no `.item()`), so it
does not stall a CUDA stream. The equations are in docs/optim.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from motian.errors import UserError

OPTIMIZERS = ("lamb", "adamw")
# How Lamb rescales the gradients before the moments (see `Lamb` and docs/optim.md).
GRAD_NORMALIZATIONS = ("clip", "block", "global", "none")
GradNormalization = Literal["clip", "block", "global", "none"]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", arXiv:1904.00962), one step for every parameter tensor w with gradient g:

        g   <- N(g)                                   # gradient normalisation, see below
        m   <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        u   =  (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        r   =  ||w|| / ||u||   (1 when either norm is 0; at most `trust_clip` when set)
        w   <- w - lr * r * u

    N depends on `grad_normalization` (G: all gradients of all groups together):

        "clip"    g / max(1, ||G|| / max_grad_norm)   NVIDIA's large-batch BERT pre-normalisation
        "block"   g / ||g||   (0 stays 0)             per tensor, every step (LANS, Zheng et al.
                                                      2020, arXiv:2006.13484)
        "global"  g / ||G||   (0 stays 0)             one norm over the model, every step
        "none"    g

    Every choice but "none" changes the gradient the moments see, not only the step size. "clip"
    (the default) is a no-op whenever ||G|| <= max_grad_norm, so after the loop's own clipping
    to the same norm it does nothing; "block" and "global" always normalise, so only the
    gradient's direction (per tensor / over the model) reaches the moments and a step's size no
    longer depends on how large that batch's gradient happened to be. `bias_correction=False`
    drops the (1 - b^t) factors.
    `always_adapt=False` applies the trust ratio only to groups with weight decay (apex's
    `use_nvlamb=False`); the paper and the default apply it to every tensor.

    Per-group keys (lr, betas, eps, weight_decay, trust_clip, always_adapt) override the
    defaults. `last_grad_norm` holds the global gradient norm of the last step (a 0-d tensor,
    before normalisation) for logging; reading it with `.item()` is the caller's sync.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True,
                 grad_normalization: GradNormalization = "clip", max_grad_norm: float = 1.0,
                 trust_clip: float | None = None, always_adapt: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr ({lr}), eps ({eps}) and weight_decay ({weight_decay}) "
                             "must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if grad_normalization not in GRAD_NORMALIZATIONS:
            raise ValueError(f"Lamb: unknown grad_normalization {grad_normalization!r}; choose "
                             f"one of {', '.join(GRAD_NORMALIZATIONS)}")
        if grad_normalization == "clip" and max_grad_norm <= 0:
            raise ValueError(f"Lamb: max_grad_norm must be > 0, got {max_grad_norm}")
        if trust_clip is not None and trust_clip <= 0:
            raise ValueError(f"Lamb: trust_clip must be > 0 or None, got {trust_clip}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip,
                        always_adapt=always_adapt)
        super().__init__(params, defaults)
        # Global settings: the norm is taken over every group at once, so they are not per group.
        self.grad_normalization = grad_normalization
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        # Per-tensor norms once: the global norm is their norm, and "block" divides by them.
        # (Whole-tensor norms also under FSDP; the divisions below act on this rank's shards.)
        norms = _norms(grads)
        grads = [_local(g) for g in grads]
        self.last_grad_norm = torch.linalg.vector_norm(norms)
        # Every divisor below stays a tensor (no host sync), and the division is in place on
        # .grad, as clip_grad_norm_ does (the loop zeroes the gradients next).
        mode = self.grad_normalization
        if mode == "clip":
            # max(1, ||G|| / max_norm): a no-op below max_norm.
            divisor = torch.clamp(self.last_grad_norm / self.max_grad_norm, min=1.0)
            _foreach_on_devices(torch._foreach_div_, grads, divisor)
        elif mode == "global":
            # ||G||, or 1 when every gradient is zero (0 / 1 keeps them zero, no NaN).
            norm = self.last_grad_norm
            _foreach_on_devices(torch._foreach_div_, grads,
                                torch.where(norm > 0, norm, torch.ones_like(norm)))
        elif mode == "block":
            # ||g|| per tensor, 1 where a tensor's gradient is all zero (it stays zero: a
            # parameter the batch did not touch gets no direction made up for it).
            divisors = torch.where(norms > 0, norms, torch.ones_like(norms))
            torch._foreach_div_(grads, [d.to(g.device, g.dtype)
                                        for d, g in zip(divisors.unbind(), grads)])
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for batch in _batches(params):
            self._update_tensors(group, batch)

    def _update_tensors(self, group: dict, params: list[Tensor]) -> None:
        """The LAMB update of `params` (one device), with foreach ops over the list.
        FSDP-sharded parameters (DTensors) are updated shard by shard; only the trust ratio's
        norms need the whole tensor, and `trust_ratios` reduces them over the shards."""
        sharded = params
        grads = [_local(p.grad) for p in params]
        exp_avgs, exp_avg_sqs, steps = self._state_of(params)
        params, exp_avgs, exp_avg_sqs = ([_local(t) for t in ts]
                                         for ts in (params, exp_avgs, exp_avg_sqs))
        beta1, beta2 = group["betas"]
        # Moments, in place over the batch: m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2.
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        # A parameter that had no gradient on some steps has its own step count, hence
        # per-tensor bias corrections.
        if group["bias_correction"]:
            bc1 = [1 - beta1 ** t for t in steps]
            bc2 = [1 - beta2 ** t for t in steps]
        else:
            bc1 = bc2 = [1.0] * len(steps)
        # u = (m / bc1) / (sqrt(v / bc2) + eps) + wd w, built in ONE temporary list (the
        # optimizer's only extra memory: one copy of the group's parameters).
        update = torch._foreach_div(exp_avg_sqs, bc2)
        torch._foreach_sqrt_(update)
        torch._foreach_add_(update, group["eps"])
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, exp_avgs)
        torch._foreach_mul_(update, [1.0 / b for b in bc1])
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        if group["always_adapt"] or group["weight_decay"] != 0:
            ratios = trust_ratios(params, update, group["trust_clip"], like=sharded)
            torch._foreach_mul_(update, ratios)
        torch._foreach_add_(params, update, alpha=-group["lr"])

    def _state_of(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """The moment buffers of `params` (created as zeros on first use), with each step
        count advanced by one. Steps are plain ints: the state dict then loads with
        `torch.load(weights_only=True)` and bias corrections are computed on the host."""
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps


def global_grad_norm(grads: list[Tensor]) -> Tensor:
    """||G||_2 over all tensors together, in fp32 (fp64 for fp64 tensors), on the first
    tensor's device (0-d)."""
    return torch.linalg.vector_norm(_norms(grads))


def trust_ratios(params: list[Tensor], update: list[Tensor],
                 clip: float | None, like: list[Tensor] | None = None) -> list[Tensor]:
    """Per tensor ||w|| / ||u||, 1 where either norm is 0 (a zero-initialised bias, or a
    parameter whose update vanished), clamped to `clip` when given. 0-d tensors, no sync.
    `like`: the DTensors `params` and `update` are the local shards of (FSDP), whose norms
    are then the whole tensors' (`_norms`)."""
    w, u = _norms(params, like), _norms(update, like)
    ratio = torch.where((w > 0) & (u > 0), w / u.clamp(min=torch.finfo(u.dtype).tiny),
                        torch.ones_like(w))
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    return [r.to(p.device, p.dtype) for r, p in zip(ratio.unbind(), params)]


CPU_BATCH_ELEMENTS = 1 << 18


def _batches(params: list[Tensor]) -> list[list[Tensor]]:
    """How to walk the parameters: on an accelerator, one list per device (a foreach op is one
    kernel launch over the whole list); on CPU, runs of tensors of at most CPU_BATCH_ELEMENTS
    elements in all (a big tensor alone), so the seven element-wise passes of a batch run while
    it is still in cache instead of streaming every parameter through memory once per op, and
    small tensors still share one call (measured in docs/optim.md)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    batches: list[list[Tensor]] = []
    for device, group in by_device.items():
        if device.type != "cpu":
            batches.append(group)
            continue
        size = CPU_BATCH_ELEMENTS
        for p in group:
            if size + p.numel() > CPU_BATCH_ELEMENTS:
                batches.append([])
                size = 0
            batches[-1].append(p)
            size += p.numel()
    return batches


def _norms(tensors: list[Tensor], like: list[Tensor] | None = None) -> Tensor:
    """(n,) the L2 norm of each tensor, accumulated in at least fp32 (bf16 grads would lose
    the sum of squares), gathered on the first tensor's device.

    Sharded tensors (FSDP's DTensors, or local shards of the DTensors in `like`): the norm of
    the WHOLE tensor, sqrt(sum over ranks of each shard's squared norm): one all-reduce of n
    numbers over the shards' process group (the same on every rank, as LAMB's trust ratio
    needs; a shard's own norm would give every rank a different ratio)."""
    group = _shard_group(like if like is not None else tensors)
    tensors = [_local(t) for t in tensors]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch.stack([n.to(tensors[0].device)
                         for n in torch._foreach_norm(tensors, 2, dtype=dtype)])
    if group is None:
        return norms
    squares = norms.square()
    torch.distributed.all_reduce(squares, group=group)
    return squares.sqrt()


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place ops update the DTensor); else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_group(tensors: list[Tensor]):
    """The process group `tensors` are sharded over (FSDP: one mesh dimension, Shard
    placements), or None for ordinary tensors. Replicated DTensors need no reduction."""
    if not tensors or not isinstance(tensors[0], DTensor):
        return None
    from torch.distributed.tensor import Shard

    mesh, placements = tensors[0].device_mesh, tensors[0].placements
    if any(not isinstance(t, DTensor) or t.device_mesh != mesh or t.placements != placements
           for t in tensors):
        raise RuntimeError("Lamb: sharded and unsharded parameters (or two shardings) in one "
                           "list; shard the whole model with fully_shard")
    if mesh.ndim != 1 or not isinstance(placements[0], Shard):
        return None if all(p.is_replicate() for p in placements) else _unsupported(placements)
    return mesh.get_group()


def _unsupported(placements) -> None:
    raise RuntimeError(f"Lamb: DTensor placements {placements} are not supported (FSDP's "
                       "one-dimensional Shard is)")


def _foreach_on_devices(op: Callable, tensors: list[Tensor], scalar: Tensor) -> None:
    """Apply an in-place foreach op with a 0-d tensor operand, per device (the operand must
    live where the tensors do)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        op(group, scalar.to(device))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: tensors with 2 or more dimensions (matrices, embeddings, the relative
    position tables) get `weight_decay`; every 1-D or 0-D tensor (biases, LayerNorm/RMSNorm
    weights and biases, learned scalars such as per-task log-variances) gets none.

    The rule is on shape, not on names, so it holds for any module: decaying a norm's gain
    towards 0 or a bias towards 0 only fights the layer's scale (BERT's `bias` and
    `LayerNorm.weight` exclusion, stated generally). Frozen parameters are left out; a tied
    weight appears once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, name: Literal["lamb", "adamw"], lr: float,
                    weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-6, groups: list[dict] | None = None,
                    grad_normalization: GradNormalization = "clip"
                    ) -> torch.optim.Optimizer:
    """The named optimiser over `param_groups(model, weight_decay)`, or over `groups` when given
    (fine-tuning passes per-layer groups with their own `lr_scale`).

    lamb: `Lamb` with bias correction and the gradient normalisation `grad_normalization`
    ("clip", the default: global pre-normalisation to norm at most 1, the large-batch BERT
    settings; "block": every tensor's gradient to norm 1, as LANS; "global"; "none").
    adamw: `torch.optim.AdamW` (decoupled weight decay, Loshchilov & Hutter 2019), the BERT
    baseline; clip its gradients in the loop. `grad_normalization` is LAMB's only: AdamW
    refuses anything but the default rather than silently ignoring it."""
    if grad_normalization not in GRAD_NORMALIZATIONS:
        raise UserError(f"unknown grad_normalization {grad_normalization!r}; choose one of "
                        f"{', '.join(GRAD_NORMALIZATIONS)}")
    if name == "adamw" and grad_normalization != "clip":
        raise UserError(f"grad_normalization {grad_normalization!r} applies to the lamb "
                        "optimizer only; adamw takes the loop's clipping (clip_norm). Use "
                        "optimizer lamb, or leave grad_normalization at 'clip'")
    groups = param_groups(model, weight_decay) if groups is None else groups
    if not groups:
        raise UserError("build_optimizer: the model has no trainable parameters")
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    grad_normalization=grad_normalization)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
