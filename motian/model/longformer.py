"""Turn a model trained on short sequences into a long-attention one (Longformer's recipe).

Beltagy et al. 2020 (arXiv:2004.05150, section 5) start Longformer from RoBERTa: the sliding
window attention reuses the pretrained q/k/v weights unchanged, and the learned absolute
position table (512 rows) is extended to 4,096 by copying it repeatedly, which keeps the local
structure the model learnt within every 512-token stretch; continued MLM pretraining then adapts
the model. Relative position schemes (t5, alibi, rope, nezha) and sinusoidal positions have no
table indexed by absolute position, so only the config changes.

`motian longformer-convert --model DIR --out DIR --max-positions 4096 --window 256` or
`motian.longformer_convert(...)`; docs/long.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from motian.errors import UserError
from motian.io import write_text_atomic
from motian.model.config import ModelConfig
from motian.model.io import FORMAT, read_state_dict

POSITION_TABLE = "embeddings.position.weight"  # suffix of the learned absolute table's key


def extend_positions(table, rows: int):
    """(n, hidden) learned positions -> (rows, hidden): the n rows copied again and again."""
    n = table.shape[0]
    repeats = -(-rows // n)
    return table.repeat(repeats, 1)[:rows].clone()


def longformer_convert(model: Path, out: Path, max_positions: int = 4096, window: int = 256,
                       dilation: int = 1, global_attention: str = "cls") -> dict:
    """Convert a motian model directory to sliding-window (Longformer) attention.

    Args:
        model: a motian model directory (config.json + model.safetensors), e.g. a pretraining
            run's final/.
        out: where to write the converted model (the other files of --model are copied).
        max_positions: the new longest sequence; learned absolute positions are copied
            repeatedly up to it (Longformer's recipe). Relative schemes keep their config.
        window: tokens each token sees on each side (attention_window).
        dilation: every dilation-th token within the window (attention_dilation).
        global_attention: cls ([CLS] sees and is seen by every token) or none.
    """
    model, out = Path(model), Path(out)
    config_path = model / "config.json"
    if not config_path.is_file():
        raise UserError(f"--model {model}: not a motian model directory (no config.json)")
    meta = json.loads(config_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise UserError(f"{config_path}: not a motian model config (a Hugging Face BERT "
                        "directory: import it first with `motian hf-convert`)")
    old = ModelConfig.from_dict(meta["model"])
    if old.position == "tupe":
        raise UserError(f"{config_path}: position='tupe' cannot use sliding attention; "
                        "convert a model with absolute, sinusoidal, rope, alibi, t5 or nezha")
    if out.resolve() == model.resolve():
        raise UserError(f"--out {out}: must differ from --model (the source is kept)")
    state = read_state_dict(model / "model.safetensors")
    changes = dict(attention="sliding", attention_window=window, attention_dilation=dilation,
                   global_attention=global_attention)
    extended = []
    if old.position == "absolute":
        if max_positions < old.max_positions:
            raise UserError(f"--max-positions {max_positions} is shorter than the model's "
                            f"{old.max_positions}; give at least {old.max_positions}")
        changes["max_positions"] = max_positions
        for key in [k for k in state if k.endswith(POSITION_TABLE)]:
            state[key] = extend_positions(state[key], max_positions)
            extended.append(key)
    new = ModelConfig.from_dict({**old.to_dict(), **changes})  # checks the sliding settings
    out.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():  # vocabulary, tokenizer, notes: whatever came with the model
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            shutil.copy2(item, out / item.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    write_text_atomic(out / "config.json",
                      json.dumps({**meta, "model": new.to_dict()}, indent=2) + "\n")
    how = (f"copied {old.max_positions} learned positions up to {max_positions}"
           if extended else f"'{old.position}' positions need no table: config only")
    print(f"{out}: sliding attention, window {window} per side, dilation {dilation}, global "
          f"{global_attention}; {how}")
    return {"out": str(out), "extended": extended, "config": new.to_dict()}


convert = longformer_convert  # the name the design notes use
