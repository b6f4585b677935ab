"""Meta-device initialisation for ``--parallel fsdp``: the model is built on ``meta`` (shapes, no
memory), sharded, and only then given memory, each rank its own shards, with the weights the
ordinary build from the same seed would have had, bit for bit.

Why not simply re-initialise after `to_empty`: motian's initialisation draws from the global
RNG in module order, including the draws of each `nn.Linear`'s own constructor that
`init_weights` then overwrites; a per-shard re-init would draw other numbers, and an FSDP run
would no longer equal a DDP or one-process run from the same seed.

How: `deferred` builds under ``torch.device("meta")`` and a dispatch mode that records, per
tensor storage, the operations that give it its values (its creation, `uniform_`, `normal_`,
`fill_`, `zero_`, ... also on views, e.g. a padding row). Each random operation also runs once
on a real temporary of the same shape, so the global RNG advances exactly as in the ordinary
build (what is built after the model draws the same numbers), and the generator's state just
before it is kept (5 KB). `materialise`, after `fully_shard`, allocates each rank's shards
(`to_empty`) and replays each parameter's recorded operations into one whole temporary, keeps
this rank's dim-0 chunk and drops the temporary: at most one whole parameter exists at a time
(the largest, e.g. the word embeddings), never the model. Only the operations since the last
one that overwrote the whole tensor are kept, so a replay is one or two operations.

What cannot be replayed is refused when that parameter is materialised, naming it: an
operation that reads another meta tensor (a weight computed from another), and the
`torch.nn.init` functions that return at once for a meta tensor (trunc_normal_, orthogonal_,
dirac_, sparse_: data-dependent sampling; motian's models use none of them).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from motian.errors import UserError

# In-place operations whose result does not depend on the tensor's old values: recorded on the
# whole tensor, they make every earlier operation on it irrelevant.
_OVERWRITE = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_",
              "cauchy_", "log_normal_", "fill_", "zero_", "copy_"}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _geometry(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride()), t.storage_offset()


@dataclass
class _Op:
    func: object  # an aten OpOverload
    args: tuple  # for an in-place op, the target as None (replaced when replayed)
    kwargs: dict
    view: tuple | None = None  # (size, stride, offset) of a partial write, e.g. one row
    rng: tuple | None = None  # (generator, its state just before the op) for random ops


@dataclass
class _Storage:
    """How one meta storage gets its values: a creation, then in-place operations."""

    ops: list[_Op] = field(default_factory=list)
    problem: str = ""  # why it cannot be replayed, if it cannot
    keep: list = field(default_factory=list)  # the meta tensor: its address is not reused

    def replay(self, geometry: tuple, name: str) -> torch.Tensor:
        """The whole tensor the ordinary build gave the tensor of `geometry` in this storage,
        on the CPU."""
        if self.problem:
            raise UserError(f"meta-device initialisation: {name} cannot be rebuilt "
                            f"({self.problem}); use --parallel ddp for this model")
        first, *rest = self.ops
        whole = _run(first, None)
        for op in rest:
            _run(op, whole if op.view is None else whole.as_strided(*op.view))
        return whole.as_strided(*geometry)


def _run(op: _Op, target: torch.Tensor | None) -> torch.Tensor:
    if op.rng is not None:
        op.rng[0].set_state(op.rng[1])
    return op.func(*(op.args if target is None else (target, *op.args[1:])), **op.kwargs)


def _cpu(kwargs: dict) -> dict:
    return {**kwargs, "device": torch.device("cpu")} if "device" in kwargs else kwargs


class _Recorder(TorchDispatchMode):
    """Records, per meta storage, what gives it its values (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, _Storage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        metas = [t for t in tree_flatten((args, kwargs))[0]
                 if isinstance(t, torch.Tensor) and t.is_meta]
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if torch.Tag.inplace in func.tags and target is not None and target.is_meta \
                and _key(target) in self.storages:
            self._in_place(func, target, args, kwargs, metas)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:  # views share a known storage; anything else is new
            if isinstance(t, torch.Tensor) and t.is_meta and _key(t) not in self.storages:
                self._created(func, t, args, kwargs, metas)
        return out

    @staticmethod
    def _advance(func, args: tuple, kwargs: dict, like: torch.Tensor | None) -> tuple:
        """Run a random op once for real, so the generator advances as in the ordinary build;
        return the generator and its state before. An in-place op runs on a real temporary of
        the target's storage and geometry (one tensor's memory, freed at once)."""
        gen = kwargs.get("generator") or torch.default_generator
        state = gen.get_state()
        if like is None:  # a random creation, randn(...): on the CPU
            func(*args, **_cpu(kwargs))
        else:
            scratch = torch.empty(like.untyped_storage().nbytes() // like.element_size(),
                                  dtype=like.dtype)
            func(scratch.as_strided(*_geometry(like)), *args[1:], **kwargs)
            del scratch
        return gen, state

    def _in_place(self, func, target: torch.Tensor, args: tuple, kwargs: dict,
                  metas: list) -> None:
        record = self.storages[_key(target)]
        if any(m is not target for m in metas):
            record.problem = record.problem or f"{func} reads another meta tensor"
            return
        size, stride, _ = _geometry(record.keep[0])
        whole = _geometry(target) == (size, stride, 0)
        random = torch.Tag.nondeterministic_seeded in func.tags
        rng = self._advance(func, args, kwargs, target) if random else None
        if whole and func.overloadpacket.__name__ in _OVERWRITE:  # what came before is moot
            record.ops = [_Op(torch.ops.aten.empty_strided.default, (size, stride),
                              {"dtype": target.dtype})]
        record.ops.append(_Op(func, (None, *args[1:]), kwargs,
                              None if whole else _geometry(target), rng))

    def _created(self, func, t: torch.Tensor, args: tuple, kwargs: dict, metas: list) -> None:
        record = self.storages[_key(t)] = _Storage(keep=[t])
        if metas:  # computed from other meta tensors: not a creation that can be repeated
            record.problem = f"{func} computes it from other meta tensors"
            return
        random = torch.Tag.nondeterministic_seeded in func.tags
        record.ops.append(_Op(func, args, _cpu(kwargs),
                              rng=self._advance(func, args, kwargs, None) if random else None))


# module built on meta -> {parameter or buffer name: (its record, its geometry)}
_PENDING: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[_Storage, tuple]]] = \
    weakref.WeakKeyDictionary()


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(), *module.named_buffers()])


@contextlib.contextmanager
def deferred(enabled: bool = True) -> Iterator[list[nn.Module]]:
    """Build the modules appended to the yielded list on the meta device (when `enabled`):

        with deferred() as built:
            built.append(build_model(config))

    The global RNG leaves in the state the ordinary build leaves it in, so what is built
    afterwards draws the same numbers. `materialise` gives the modules memory and their
    weights, after sharding."""
    built: list[nn.Module] = []
    if not enabled:
        yield built
        return
    recorder = _Recorder()
    with torch.device("meta"), recorder, _refuse_meta_skips(recorder):
        yield built
    for module in built:  # names now: fully_shard keeps the names, not the tensors
        _PENDING[module] = {name: (recorder.storages[_key(t)], _geometry(t))
                            for name, t in _named_tensors(module).items() if t.is_meta}


# torch.nn.init functions that return at once for a meta tensor (data-dependent sampling):
# their values and RNG draws cannot be recorded, so a tensor they touch cannot be rebuilt.
_SKIP_META = ("_no_grad_trunc_normal_", "orthogonal_", "dirac_", "sparse_")


@contextlib.contextmanager
def _refuse_meta_skips(recorder: _Recorder) -> Iterator[None]:
    originals = {name: getattr(nn.init, name) for name in _SKIP_META}

    def refusing(name):
        def mark(tensor, *args, **kwargs):
            if tensor.is_meta and _key(tensor) in recorder.storages:
                shown = name.replace("_no_grad_", "")
                recorder.storages[_key(tensor)].problem = (
                    f"torch.nn.init.{shown} draws nothing for a meta tensor")
            return originals[name](tensor, *args, **kwargs)
        return mark

    for name in _SKIP_META:
        setattr(nn.init, name, refusing(name))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(nn.init, name, function)


def is_deferred(module: nn.Module) -> bool:
    return any(sub in _PENDING for sub in module.modules())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _shard(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `whole` for `like`: an FSDP2 DTensor's dim-0 chunk (as torch.chunk
    splits it: 7 rows on 2 ranks are 4 + 3), all of it for a plain tensor."""
    from torch.distributed.tensor import Shard

    part = whole
    for mesh_dim, placement in enumerate(getattr(like, "placements", ())):
        if isinstance(placement, Shard):
            chunks = torch.chunk(part, like.device_mesh.size(mesh_dim), dim=placement.dim)
            rank = like.device_mesh.get_local_rank(mesh_dim)
            part = (chunks[rank] if rank < len(chunks)
                    else part.narrow(placement.dim, 0, 0))
    return part


def materialise(module: nn.Module, device: torch.device) -> None:
    """Give a module built by `deferred` (sharded by `fully_shard` or not) memory on `device`
    (`to_empty`: each rank its shards) and the ordinary build's weights: each parameter and
    buffer rebuilt whole on the CPU, one at a time, and only this rank's part kept. Tensors
    that were real already (built outside `deferred`, e.g. task weights) keep their values;
    the global RNG is left as it was. A no-op when nothing is deferred."""
    plans = {}
    for prefix, sub in module.named_modules():
        for name, plan in _PENDING.get(sub, {}).items():
            plans[f"{prefix}.{name}".lstrip(".")] = plan
    if not plans:
        return
    tensors = _named_tensors(module)
    unknown = sorted(n for n, t in tensors.items() if _local(t).is_meta and n not in plans)
    if unknown:
        raise UserError(f"meta-device initialisation: {', '.join(unknown[:3])} is on meta but "
                        "was not built under `deferred`; nothing can initialise it")
    real = {n: _local(t).detach().clone() for n, t in tensors.items() if not _local(t).is_meta}
    state = torch.default_generator.get_state()
    with torch.no_grad():
        module.to_empty(device=device)
        tensors = _named_tensors(module)
        try:
            for name, (record, geometry) in plans.items():
                whole = record.replay(geometry, name)
                _local(tensors[name]).copy_(_shard(whole, tensors[name]))
                del whole  # before the next one: one whole parameter at a time
        finally:
            torch.default_generator.set_state(state)
        for name, value in real.items():
            _local(tensors[name]).copy_(value)
    for sub in module.modules():
        _PENDING.pop(sub, None)
