"""Generation tasks (a source text -> a target text, e.g. `pd98-headline-gen`) in `motian
finetune` and `motian evaluate`: what differs from the classification tasks, kept out of
`motian.finetuning` so that file stays about the shared path.

* A causal LM is fine-tuned as a conditional language model: one row
  [CLS] source [SEP] target [SEP] (`motian.tasks.features`), the loss on the target tokens and
  the final [SEP] only (the source is context, not something to learn to write). Attention
  stays left to right over the whole row, as in pretraining and as the KV-cache decoder reads
  the prompt; a bidirectional source would train a GPT on attention that its decoder with a
  cache does not reproduce.
* A UNILM (`UnifiedLM`) or MASS (`Seq2SeqLM`) model keeps its family: the same row becomes
  its own fine-tuning inputs (`generation_rows`, `motian.tasks.generation_rows`): UNILM's
  seq2seq mask with masked target tokens, MASS's prompt + [MASK]s for the encoder and the
  target for the decoder - each what its decoder in `motian.serving.prefix_decoding` reads.
* Predictions are decoded with `motian.serving.generate` (greedy, or beam search in
  `evaluate`) from the prompt [CLS] source [SEP] until [SEP], for at most as many tokens as the
  longest training target: the decoder learns the target lengths, this only bounds a run-on.
* Scores are character-level ROUGE-1/2/L F1 and corpus BLEU-4 (`motian.tasks.metrics`).
* The floor beside every result is the lead baseline: the source's first N characters, N =
  the mean training target length (for news, the lead *is* the usual extractive baseline).

Layer 5 (beside finetuning): it imports serving's decoder and the task layer below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from motian.data.tokenizer import decode_text, special_token_ids
from motian.errors import UserError
from motian.model.artifact import is_hf_bert, resolve_model_dir
from motian.model.heads import UnifiedLM
from motian.model.seq2seq import Seq2SeqLM
from motian.serving.generate import Decoding, generate_ids
from motian.tasks.features import Featurizer
from motian.tasks.generation_rows import mass_rows, unilm_rows
from motian.tasks.heads import GENERATION_NEEDS_CAUSAL
from motian.tasks.metrics import characters, generation_scores
from motian.tasks.types import Example, Task


def check_generation_run(task: Task, model: Path | None, aux_mlm: float) -> None:
    """Refuse, before any training, what cannot fine-tune a generation task: no starting model
    (the presets are bidirectional encoders), a masked-LM (bidirectional) model that was not
    pretrained to generate (UNILM and MASS were), or the auxiliary MLM loss (the generation
    rows are the model's whole objective)."""
    if model is None:
        raise UserError(f"{task.name}: {GENERATION_NEEDS_CAUSAL}; --preset builds an encoder, "
                        "so give --model (add --random-init for the from-scratch control)")
    head = "Hugging Face BERT"
    causal = False
    if not is_hf_bert(Path(model)):
        meta = json.loads((resolve_model_dir(Path(model)) / "config.json").read_text("utf-8"))
        head, causal = meta.get("head") or "backbone", bool(meta["model"].get("causal"))
    if not causal and head not in ("UnifiedLM", "Seq2SeqLM"):
        raise UserError(f"{model}: a bidirectional model ({head}); {GENERATION_NEEDS_CAUSAL}")
    if aux_mlm:
        raise UserError(f"--aux-mlm {aux_mlm}: the auxiliary masked-LM loss is for encoders "
                        "fine-tuned on classification or tagging; a generation task trains the "
                        "model on its own generation rows (drop it)")


def max_new_tokens(task: Task, featurize: Featurizer) -> int:
    """The decoding limit: the longest training target in tokens (as featurised, so capped
    like the rows the model learned from)."""
    targets = [f.input_ids[f.start:-1] for f in featurize(task.splits.get("train", []))]
    return max((len(t) for t in targets), default=featurize.max_length // 2)


@torch.no_grad()
def generate_predictions(model: nn.Module, task: Task, examples: list[Example],
                         featurize: Featurizer, device: torch.device, batch_size: int = 64,
                         num_beams: int = 1) -> list[str]:
    """One generated text per example: decoded from [CLS] source [SEP] until [SEP] (never
    [PAD], [CLS], [MASK] or [UNK]), greedy or with `num_beams` beams."""
    special = special_token_ids(featurize.tok)
    decoding = Decoding(max_new_tokens=max_new_tokens(task, featurize), num_beams=num_beams)
    unlabelled = [Example(e.guid, e.text, where=e.where) for e in examples]
    # [CLS] source [SEP], the source cut so that prompt + generated tokens + [SEP] stay within
    # max_length, as every training row did (a model with learned positions has no more).
    keep = max(featurize.max_length - decoding.max_new_tokens - 1, 3)
    prompts = [ids if len(ids) <= keep else ids[:keep - 1] + [special["sep"]]
               for ids in (f.input_ids for f in featurize(unlabelled))]
    model = model.to(device)
    banned = [special[k] for k in ("pad", "cls", "mask", "unk")]
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        generated = generate_ids(model, prompts[i:i + batch_size], decoding, special["pad"],
                                 [special["sep"]], banned, mask_id=special["mask"])
        out += [decode_text(featurize.tok, tokens) for tokens in generated.tokens]
    return out


def generation_rows(model: nn.Module, task: Task, featurize: Featurizer
                    ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]] | None:
    """What a collated generation batch becomes before `model` reads it in fine-tuning: UNILM's
    and MASS's own rows (module docstring); None for a causal LM (it reads the batch as is)
    and for other tasks."""
    if task.type != "generation":
        return None
    special = special_token_ids(featurize.tok)
    mask, pad = special["mask"], special["pad"]
    if isinstance(model, UnifiedLM):
        return lambda batch: unilm_rows(batch, mask)
    if isinstance(model, Seq2SeqLM):
        fill = max_new_tokens(task, featurize)  # the [MASK]s its decoder is given, too
        return lambda batch: mass_rows(batch, mask, pad, fill, featurize.max_length)
    return None


def lead_baseline(train: list[Example], evals: dict[str, list[Example]]) -> dict:
    """The source's first N characters (whitespace aside) as the prediction, N = the mean
    training target length rounded; its scores on each evaluation split."""
    lengths = [len(characters(e.target)) for e in train if e.target is not None]
    n = round(sum(lengths) / len(lengths)) if lengths else 0
    out: dict = {"label": f"lead {n} characters", "chars": n}
    for split, examples in evals.items():
        if examples and all(e.target is not None for e in examples):
            out[split] = generation_scores([e.target for e in examples],
                                           ["".join(characters(e.text)[:n]) for e in examples])
    return out
