"""What a model path on disk can be, and the one place that reads it.

A verb that takes `--model` / `--teacher` / `--checkpoint` may be given

* a motian model directory: config.json (`format: motian-model`) + model.safetensors
  (`motian.model.io.save_pretrained`; a pretraining run's final/, a fine-tuned seed-N/model);
* a training checkpoint: run/checkpoints/step-NNNNNNNN (a model directory plus optimizer,
  RNG and loop state, `motian.train.checkpoint`);
* a training run: its latest complete checkpoint, else its final/ model;
* a Hugging Face BERT directory (config.json with model_type "bert").

Beside the weights a model directory may hold its tokenizer (tokenizer.json / vocab.txt) and,
when `motian finetune` wrote it, its task card (task.json: task name, type, labels, tagging
scheme, max_length), which `evaluate`, `distill`, `export` and `predict` read back.

This module sits above motian.model.* and motian.data.tokenizer and below training, tasks and
serving: it imports none of those.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from motian.data.tokenizer import encoded_tokenizer
from motian.errors import UserError
from motian.io import write_json_atomic
from motian.model.config import ModelConfig
from motian.model.io import FORMAT, from_pretrained, read_state_dict

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # unsharded; sharded ones are not hashed
TASK_CARD = "task.json"
FINAL = "final"  # a finished run's model: run/final
RUN_RECORD = "run.json"  # what makes a directory a pretraining run
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # what `load_tokenizer` reads, preferred first
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # HF settings

# Checkpoint layout (written by motian.train.checkpoint): run/checkpoints/step-NNNNNNNN, and a
# `latest` file naming the newest complete one. A `step-...` name always means complete.
CHECKPOINTS = "checkpoints"
LATEST = "latest"
REQUIRED = ("config.json", "model.safetensors", "optimizer.pt", "state.json")
# A sharded checkpoint (--parallel fsdp, motian.train.sharded): every rank's shards of the model
# and optimizer in one torch.distributed.checkpoint directory, the model's config as model.json
# (not config.json: the directory is not a model directory until `motian consolidate`).
SHARDED = "sharded"
SHARDED_REQUIRED = ("model.json", f"{SHARDED}/.metadata", "state.json")
NAME = re.compile(r"step-(\d{8,})")


# --------------------------------------------------------------------------- locating a model


def is_hf_bert(directory: str | Path) -> bool:
    """True if `directory` holds a Hugging Face BERT config (model_type "bert")."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return False
    return _read_json(path).get("model_type") == "bert"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (all((path / f).is_file() for f in REQUIRED)
                              or is_sharded_checkpoint(path))


def is_sharded_checkpoint(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in SHARDED_REQUIRED)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `run_dir`, oldest step first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME.fullmatch(p.name) and is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, if complete; otherwise the complete one with the highest
    step (a kill between the rename and the `latest` update); None when there is none.
    Temporary and half-deleted directories are never returned."""
    directory = Path(run_dir) / CHECKPOINTS
    try:
        named = (directory / LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        named = ""
    if named and NAME.fullmatch(named) and is_complete_checkpoint(directory / named):
        return directory / named
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding config.json + weights that `path` stands for: `path` itself (a
    model directory, a checkpoint, a Hugging Face directory), else for a training run its
    latest complete checkpoint (the run's last step when it finished), else its final/."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and not is_sharded_checkpoint(latest):
        return latest
    if (path / FINAL / CONFIG).is_file():
        return path / FINAL
    if latest is not None:  # only sharded checkpoints (an FSDP run stopped before its end)
        raise UserError(f"{path}: its latest checkpoint {latest.name} is sharded (--parallel "
                        "fsdp); write it as a model directory first: motian consolidate "
                        f"--checkpoint {latest} --out MODEL_DIR")
    what = "does not exist" if not path.exists() else (
        f"has no {CONFIG}, no complete checkpoint under {CHECKPOINTS}/ and no {FINAL}/ model")
    raise UserError(f"{path}: {what}; give a motian model directory ({CONFIG} + {WEIGHTS}), a "
                    f"checkpoint (run/{CHECKPOINTS}/step-NNNNNNNN), a training run directory "
                    "or a Hugging Face BERT directory")


# --------------------------------------------------------------------------- weights


class Backbone(NamedTuple):
    """Pretrained weights to start from: keys rooted at `backbone.` (and `mlm.` when the
    source has a masked-LM head), their config, the file hashed for the record (None for a
    sharded Hugging Face checkpoint) and a one-line description of the source."""

    state: dict[str, Tensor]
    config: ModelConfig
    weights: Path | None
    description: str


def load_backbone_state(path: str | Path) -> Backbone:
    """The pretrained encoder (and MLM head) at `path`: a motian model directory, checkpoint or
    training run, or a Hugging Face BERT directory (converted by `motian.model.hf`)."""
    path = Path(path)
    if is_hf_bert(path):
        from motian.model.hf import import_bert  # maps BERT names; transformers not needed

        lm, _ = import_bert(path, head="MaskedLM")
        weights = next((path / n for n in HF_WEIGHTS if (path / n).is_file()), None)
        return Backbone(lm.state_dict(), lm.config, weights, f"Hugging Face BERT {path}")
    directory = resolve_model_dir(path)
    meta = _read_json(directory / CONFIG)
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory / CONFIG}: neither a motian model (format {FORMAT!r}) nor "
                        f"a Hugging Face BERT config (model_type {meta.get('model_type')!r})")
    weights = directory / WEIGHTS
    state = _rooted_at_backbone(read_state_dict(weights), str(weights))
    return Backbone(state, ModelConfig.from_dict(meta["model"]), weights,
                    f"motian checkpoint {directory}")


def _rooted_at_backbone(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Keys re-rooted at `backbone.` / `mlm.`, whatever wrapper saved them (a pretraining
    wrapper may add a prefix such as `model.`)."""
    prefixes = {k[:k.index("backbone.")] for k in state if "backbone." in k}
    if not prefixes:
        raise UserError(f"{source}: no backbone weights found in the checkpoint")
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- tokenizer


def holds_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def find_tokenizer(model: str | Path | None, tokenizer: str | Path | None = None) -> Path:
    """`tokenizer` if given, else the tokenizer the model was trained with, looked up along its
    provenance rather than guessed: the model directory itself (a pretraining run's final/, a
    fine-tuned model, an export, a Hugging Face directory), the pretraining run it belongs to
    (the run directory itself or the one above final/ or checkpoints/step-N, which `motian
    pretrain` gives a copy, else the encoded data its run.json names), and last the
    `tokenizer/` folder `motian prepare` writes beside the run (runs made before runs recorded
    their data)."""
    if tokenizer is not None:
        return Path(tokenizer)
    if model is None:
        raise UserError("no tokenizer: a randomly initialised model needs --tokenizer (a "
                        "directory written by `motian tokenizer`, a tokenizer.json or a vocab.txt)")
    here = Path(model).resolve()
    if holds_tokenizer(here):
        return here
    for run_dir in (here, *here.parents[:2]):
        if (run_dir / RUN_RECORD).is_file():
            if holds_tokenizer(run_dir):
                return run_dir
            data = _read_json(run_dir / RUN_RECORD).get("data")
            if data:
                found = encoded_tokenizer(Path(data))
                if found is not None:
                    return found
    for directory in here.parents[:3]:
        if holds_tokenizer(directory / "tokenizer"):
            return directory / "tokenizer"
    raise UserError(f"{model}: found no tokenizer in it, in its pretraining run or in the data "
                    "that run recorded; pass --tokenizer (the out/tokenizer directory of `motian "
                    "prepare`, a tokenizer.json or a vocab.txt)")


def copy_tokenizer(source: str | Path, out: str | Path) -> list[Path]:
    """Copy a tokenizer (a tokenizer.json / vocab.txt file, or a directory: its tokenizer files
    and Hugging Face's settings beside them) into directory `out`; the files written."""
    source, out = Path(source), Path(out)
    names = TOKENIZER_FILES + TOKENIZER_SIDE_FILES
    files = [source] if source.is_file() else [source / n for n in names
                                               if (source / n).is_file()]
    if not files:
        raise UserError(f"{source}: no tokenizer files ({', '.join(names)}) found")
    written = []
    for f in files:
        if f.resolve() != (out / f.name).resolve():
            shutil.copyfile(f, out / f.name)
        written.append(out / f.name)
    return written


# --------------------------------------------------------------------------- task card


@dataclass
class TaskCard:
    """task.json, written beside a fine-tuned model by `motian finetune`: what the model's
    outputs mean and how its inputs were laid out."""

    name: str  # the task the model was fine-tuned on (`motian finetune --task`)
    type: str  # single, pair, choice, token or span (motian.tasks.types.TaskType)
    labels: list[str] = field(default_factory=list)  # class names; entity types for token tasks
    scheme: str = "BIO"  # tagging scheme of token tasks: BIO or BIOES
    clue: str | None = None  # CLUE's name for the task, when it is one
    max_length: int | None = None  # tokens per input at fine-tuning
    format: str | None = None  # your own files' format (text-classification, ...); `name` is then yours

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / TASK_CARD
        write_json_atomic(path, asdict(self))
        return path

    def check_labels(self, labels: list[str], directory: str | Path) -> None:
        """Refuse a task whose labels are not the ones the model at `directory` learned."""
        if list(labels) != list(self.labels):
            raise UserError(f"{directory}: trained with labels {self.labels} but the task now "
                            f"has {list(labels)}")

    @classmethod
    def read(cls, directory: str | Path) -> TaskCard:
        """The card of a fine-tuned model; a UserError naming `directory` when it has none."""
        card = cls.read_optional(directory)
        if card is None:
            directory = Path(directory)
            seeds = sorted(directory.glob(f"seed-*/model/{TASK_CARD}"))
            hint = f" (e.g. {seeds[0].parent})" if seeds else ""
            raise UserError(f"{directory}: no {TASK_CARD}; give a model directory written by "
                            f"`motian finetune`, out/seed-N/model{hint}")
        return card

    @classmethod
    def read_optional(cls, directory: str | Path) -> TaskCard | None:
        """The card, or None for a model that was not fine-tuned. A card written by hand needs
        only `type` (and `labels` to name the outputs); its name then reads as ""."""
        path = Path(directory) / TASK_CARD
        if not path.is_file():
            return None
        data = _read_json(path)
        if not isinstance(data.get("type"), str):
            raise UserError(f"{path}: no task type; write it again with `motian finetune`")
        known = {f.name for f in fields(cls)}  # keys a later version may add are skipped
        return cls(**{"name": "", **{k: v for k, v in data.items() if k in known}})


def load_task_model(directory: str | Path) -> tuple[nn.Module, TaskCard]:
    """A fine-tuned model and its task card (out/seed-N/model of `motian finetune`)."""
    card = TaskCard.read(directory)
    return from_pretrained(directory), card


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- vocabularies


def tokenizer_vocab_hash(tokenizer) -> str:
    """SHA-256 of a tokenizer's tokens in id order: the same value `data.shards.vocab_hash`
    gives for its vocab.txt and `encode` records in the shards' manifest."""
    import hashlib

    from motian.data.tokenizer import vocab_tokens

    return hashlib.sha256("\n".join(vocab_tokens(tokenizer)).encode("utf-8")).hexdigest()


def model_vocab_hash(directory: str | Path) -> str | None:
    """The vocabulary hash a motian model (or checkpoint) recorded; None when it has none
    (a Hugging Face directory, or a model saved before models recorded it)."""
    try:
        meta = json.loads((Path(directory) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("vocab_hash") if isinstance(meta, dict) else None


def check_vocab(model_hash: str | None, other_hash: str | None, model: str | Path,
                other: str | Path, allow_mismatch: bool = False) -> None:
    """Refuse to pair a model with a tokenizer or shards of another vocabulary (same size but
    other tokens or order included): its token ids would mean other tokens. Unknown hashes
    pass; `allow_mismatch` lets through a user who means it (with a warning)."""
    if model_hash is None or other_hash is None or model_hash == other_hash:
        return
    text = (f"{model} was trained with another vocabulary than {other} (vocabulary hash "
            f"{model_hash[:12]} vs {other_hash[:12]}): its token ids would mean other tokens")
    if not allow_mismatch:
        raise UserError(text + "; use the tokenizer (or shards) it was trained with, or pass "
                        "--allow-vocab-mismatch if you mean it (e.g. a vocabulary you extended "
                        "at the end)")
    import sys

    print(f"motian: warning: {text}; going on as --allow-vocab-mismatch asks", file=sys.stderr)
