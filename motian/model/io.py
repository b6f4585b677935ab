"""motian's own checkpoint directory (config.json + model.safetensors) and the one weight loader
every import path uses.

`load_weights` strips wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from DDP),
checks shapes, and reports loudly every key that did not load: a silently re-initialised MLM
head or a resized segment table is the most common conversion complaint against other
toolkits, so it is printed, returned, and an error under `strict`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from motian.errors import UserError
from motian.io import write_text_atomic
from motian.model.config import ModelConfig
from motian.model.heads import HEADS

FORMAT = "motian-model"
FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class LoadReport:
    """Keys the model wanted but did not get, keys the checkpoint had but the model does not
    use, and keys whose shapes differed (left at their initial values)."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{self.source}: weights did not all load"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"  {name} ({len(keys)}): {shown}")
        return "\n".join(parts)


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove `_orig_mod.` / `module.` wherever they lead a key (or follow another wrapper)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The motian model inside torch.compile (`_orig_mod`) and DDP / DataParallel (`module`)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str,
                 strict: bool = False, quiet: bool = False) -> LoadReport:
    """Copy `state` into `model`; return (and print unless `quiet`) what did not load.
    Under `strict`, any missing, unexpected or mismatched key raises `UserError`."""
    state = strip_wrapper_prefixes(state)
    own = model.state_dict()
    report = LoadReport(source)
    report.missing = sorted(k for k in own if k not in state)
    report.unexpected = sorted(k for k in state if k not in own)
    usable = {}
    for key in sorted(set(own) & set(state)):
        if own[key].shape != state[key].shape:
            report.mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model "
                                     f"{tuple(own[key].shape)}")
        else:
            usable[key] = state[key]
    model.load_state_dict(usable, strict=False)
    if not report.ok:
        if strict:
            raise UserError(report.summary() + "\n(strict load: fix the checkpoint or the config, "
                            "or load with strict=False to keep the freshly initialised values)")
        if not quiet:
            print("motian: warning: " + report.summary(), file=sys.stderr)
    return report


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights from .safetensors, or a torch pickle read with `weights_only=True` (no code runs)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file: say which file and why
        raise UserError(f"{path}: cannot read weights safely ({e}); convert the checkpoint to "
                        "safetensors") from None


def save_pretrained(model: nn.Module, directory: str | Path,
                    state: dict[str, Tensor] | None = None) -> Path:
    """Write `model` as config.json (format, head, model config) + model.safetensors.
    `state`: the weights to write instead of `model.state_dict()` (an FSDP-sharded model's,
    gathered whole by `motian.train.distributed.full_model_state`)."""
    model = unwrap_model(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_text_atomic(directory / "config.json", json.dumps(model_meta(model), indent=2) + "\n")
    return directory


def model_meta(model: nn.Module) -> dict:
    """config.json's content for `model`: format, head class and arguments, model config."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "head": type(model).__name__,
            "head_kwargs": getattr(model, "head_kwargs", {}), "model": model.config.to_dict()}
    if getattr(model, "vocab_hash", None):  # what its token ids mean (see artifact.check_vocab)
        meta["vocab_hash"] = model.vocab_hash
    return meta


def from_pretrained(directory: str | Path, strict: bool = True,
                    **config_overrides) -> nn.Module:
    """Rebuild the head class recorded in `directory`/config.json and load its weights.
    `config_overrides` change settings that do not alter shapes (dropout, checkpointing, ...)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: not a motian model directory (no config.json)")
    meta = json.loads(config_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        from motian.model.artifact import is_hf_bert  # artifact builds on this module

        hint = (" (a Hugging Face BERT directory: use motian.model.hf.import_bert)"
                if is_hf_bert(directory) else "")
        raise UserError(f"{config_path}: not a motian model config{hint}")
    if meta.get("head") not in HEADS:
        raise UserError(f"{config_path}: unknown head {meta.get('head')!r}; known: "
                        f"{', '.join(HEADS)}")
    config = ModelConfig.from_dict({**meta["model"], **config_overrides})
    model = HEADS[meta["head"]](config, **meta.get("head_kwargs", {}))
    weights = directory / "model.safetensors"
    load_weights(model, read_state_dict(weights), str(weights), strict=strict)
    model.vocab_hash = meta.get("vocab_hash")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
