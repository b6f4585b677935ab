"""Progressive stacking: change the number of Transformer blocks of a model in place.

Gong et al. 2019 ("Efficient Training of BERT by Progressively Stacking", ICML, PMLR 97) saw
that the attention of a trained shallow BERT's layers looks like that of the layers above
them in a deep one, so a deep model can start from a shallow one stacked on itself: train L
blocks, copy them on top (block L + i starts as block i), train 2L, and so on (3 -> 6 -> 12
for BERT-base, the same accuracy in ~25% less time). `grow` does the copy; `set_depth` also
cuts a freshly built model down to a stage's depth (a run starts shallow, a resume rebuilds
the depth its checkpoint was saved at). The plan (which stage trains how many blocks) is
`motian.train.settings.depth_plan`; the loop calls these at stage changes (`motian.train.fit`).

Everything outside the blocks (embeddings, relative-position tables shared by all layers, the
final LayerNorm, the heads) is one module whatever the depth, so only the blocks change. The
copies are new modules with their own tensors (`copy.deepcopy`): training one never moves the
other. The model's `config.layers` follows, so a checkpoint written at any depth is an ordinary
model directory that loads at that depth.
"""

from __future__ import annotations

import copy

from torch import nn

from motian.errors import UserError


def backbone_of(model: nn.Module) -> nn.Module:
    """The `MotianModel` whose blocks stack: `model` itself or its `backbone` (every head)."""
    backbone = getattr(model, "backbone", model)
    if not isinstance(getattr(backbone, "blocks", None), nn.ModuleList):
        raise UserError(f"{type(model).__name__} has no Transformer blocks to stack; progressive "
                        "stacking (a stage's layers) needs a motian model")
    return backbone


def depth(model: nn.Module) -> int:
    """How many blocks `model` runs now."""
    return len(backbone_of(model).blocks)


def grow(model: nn.Module, layers: int) -> list[tuple[nn.Module, nn.Module]]:
    """Stack copies of the top blocks of `model` until it has `layers` blocks; returns the
    (copy, source) pairs made. From L to M <= 2L blocks, block L + i is a copy of block
    2L - M + i (the top M - L blocks, in order; M = 2L copies all of them, as Gong et al.).
    Beyond 2L it stacks again on the result (a resume rebuilding a deep checkpoint's shape;
    its weights are loaded over them)."""
    backbone = backbone_of(model)
    blocks = backbone.blocks
    if layers < len(blocks):
        raise UserError(f"grow: the model has {len(blocks)} blocks, more than {layers}")
    pairs = []
    while len(blocks) < layers:
        n = len(blocks)
        k = min(n, layers - n)
        for source in list(blocks)[n - k:]:
            twin = copy.deepcopy(source)  # new parameters with the same values, same device
            blocks.append(twin)
            pairs.append((twin, source))
    _set_config(model, backbone, layers)
    return pairs


def set_depth(model: nn.Module, layers: int) -> None:
    """Give `model` exactly `layers` blocks: keep the bottom ones, or `grow` by copying."""
    backbone = backbone_of(model)
    if layers < 1:
        raise UserError(f"set_depth: a model needs at least 1 block, not {layers}")
    if layers > len(backbone.blocks):
        grow(model, layers)
        return
    del backbone.blocks[layers:]
    _set_config(model, backbone, layers)


def _set_config(model: nn.Module, backbone: nn.Module, layers: int) -> None:
    # The head and the backbone each hold the config; save_pretrained writes the head's, so a
    # checkpoint records the depth it was saved at.
    backbone.config = backbone.config.replace(layers=layers)
    if model is not backbone and hasattr(model, "config"):
        model.config = model.config.replace(layers=layers)
