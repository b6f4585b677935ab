"""`motian adapt`: ULMFiT's target-task language-model stage (Howard & Ruder 2018).

    motian adapt --task reviews-sentiment --model runs/demo/pretrain --out runs/adapt --steps 300
    motian finetune --task reviews-sentiment --model runs/adapt --out runs/adapt-finetune

Between general pretraining and fine-tuning, ULMFiT goes on training the language model on the
target task's own text, so the model meets the task's vocabulary and style before it sees a
label. Here that is masked-LM pretraining continued from `--model` on the texts of the task's
*training* split, labels dropped (dev and test texts are never read): the texts are written to
out/task-text.jsonl, encoded with the model's tokenizer into out/encoded, and trained by the
one pretraining loop (`motian.pretraining.pretrain_recipe`) with a recipe made from the
model's own shape, so out/ is an ordinary pretraining run: `motian finetune --model out` starts
from its weights, `--resume` continues it. The learning rate follows ULMFiT's slanted
triangular schedule by default (`decay: stlr`). Every 20th text is held out, and the run's
masked-token loss on them at its start and end says whether the stage learned the task's text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from motian.data.encode import encode
from motian.errors import UserError
from motian.finetuning import load_task, subset
from motian.io import write_text_atomic
from motian.model.artifact import find_tokenizer, load_backbone_state, resolve_model_dir
from motian.pretraining import pretrain_recipe
from motian.train.metrics import read_metrics
from motian.train.recipe import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    ObjectiveSpec,
    Recipe,
    load_recipe,
)
from motian.train.settings import OptimSettings, RunSettings, Stage

# The config fields that say how a model runs, not what it is (the run settings decide them).
_RUN_FIELDS = ("vocab_size", "checkpoint_activations")
# Every 20th text is held out for the stage's masked-token evaluation (task texts are short:
# 5% of a few thousand reviews fill a few dozen rows of 128 tokens).
HOLDOUT_EVERY = 20


def task_texts(task: str, data: Path | None = None, name: str | None = None,
               max_train: int | None = None) -> list[str]:
    """The texts of a task's training split without their labels: each example's text, and
    its second text (pairs, questions) on a line of its own in the same document."""
    the_task = load_task(task, data, own_name=name)
    train = subset(the_task.splits.get("train") or [], max_train)
    texts = ["\n".join(t for t in (e.text, e.text_b) if t and t.strip()) for e in train]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{task}: the training split has no text to adapt the model to")
    return texts


def adapt(task: str, model: Path, out: Path, steps: int = 300, data: Path | None = None,
          name: str | None = None, tokenizer: Path | None = None, max_train: int | None = None,
          masking: str | None = None, seq_len: int = 128, batch_size: int = 32,
          resume: bool = False,
          optim: OptimSettings = OptimSettings(lr=5e-4, decay="stlr"),
          run: RunSettings = RunSettings()) -> dict:
    """ULMFiT's target-task LM stage: continue masked-LM pretraining of --model on the task's own
    training texts (no labels), then fine-tune from it with `motian finetune --model OUT`.

    Writes out/task-text.jsonl (the texts), out/encoded (their shards) and the pretraining
    run in out (checkpoints, final/, metrics.jsonl with the held-out masked-token loss at the
    start and the end).

    Args:
        task: reviews-sentiment, pd98-ner, pd98-seg, a CLUE task or your own (with --data), as
            for `motian finetune`; only its training split's texts are read.
        model: the pretrained model to adapt (a pretraining run, checkpoint or model directory,
            or a Hugging Face BERT directory).
        out: run directory.
        steps: optimizer steps of the stage.
        data: the task's directory (CLUE and your own tasks).
        name: your own task's name (text-classification, text-pair, ner).
        tokenizer: the model's tokenizer (default: found beside the model).
        max_train: read only N training examples (the same stable sample as finetune's).
        masking: masking preset of the stage (bert, wwm, spanbert, motian); default: the
            masking the model was pretrained with (its run's recipe.yaml), else bert. The
            task's text carries no entity marks, so entity masking is left out.
        seq_len: tokens per packed row.
        batch_size: rows per optimizer step.
        resume: continue an interrupted stage in --out from its latest checkpoint.
        optim: optimiser and schedule; by default AdamW at 5e-4 with ULMFiT's slanted
            triangular rate (decay stlr, cut_frac 0.1, ratio 32).
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    out = Path(out)
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    backbone = load_backbone_state(model)
    if backbone.config.causal:
        raise UserError(f"--model {model}: a causal (GPT-style) model; the target-task stage "
                        "continues masked-LM pretraining and needs an encoder")
    tok_path = find_tokenizer(model, tokenizer)
    texts = task_texts(task, data, name, max_train)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "task-text.jsonl"
    write_text_atomic(corpus, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                      for t in texts))
    encode([str(corpus)], out / "encoded", tok_path, workers=1, progress=run.progress)
    config = backbone.config.to_dict()
    recipe = Recipe(
        name=f"adapt-{name or task}",
        model=ModelSpec(overrides={k: v for k, v in config.items() if k not in _RUN_FIELDS}),
        data=DataSpec(**_masking_of(model, masking), pair_task="none",
                      cross_document_attention=config["cross_document_attention"]),
        objective=ObjectiveSpec(kind="mlm", weighting="fixed", weights={"mlm": 1.0}),
        optim=optim,
        stages=(Stage(seq_len=seq_len, global_batch=batch_size,
                      warmup=0.0 if optim.decay == "stlr" else 0.06, name="task-lm"),),
        steps=steps, eval=EvalSpec(every="50%", holdout_every=HOLDOUT_EVERY, seq_len=seq_len,
                                    batch=8),
        checkpoint_every=0)
    # init_from is applied only when `out` holds no checkpoint yet, so --resume on a stage that
    # never saved one still starts from --model (not from random weights)
    summary = pretrain_recipe(recipe, run, out / "encoded", out, resume=resume,
                              init_from=resolve_model_dir(model))
    if summary["rank"] == 0:
        print(adapt_line(out, task), file=sys.stderr, flush=True)
    return summary


def _masking_of(model: Path, masking: str | None) -> dict:
    """DataSpec's masking fields for the stage: `masking` if given, else those of the recipe
    the model was pretrained with (recipe.yaml of its run), else BERT's; entity_prob 0."""
    if masking is not None:
        return {"masking": masking}
    here = resolve_model_dir(model).resolve()
    for run_dir in (here, *here.parents[:2]):
        if (run_dir / "recipe.yaml").is_file():
            data = load_recipe(run_dir / "recipe.yaml").data
            return {"masking": data.masking,
                    "masking_overrides": {**data.masking_overrides, "entity_prob": 0.0}}
    return {"masking": "bert"}


def adapt_line(out: Path, task: str) -> str:
    """The held-out masked-token loss at the stage's start and end, and the next command."""
    evals = [e for e in read_metrics(out / "metrics.jsonl", "eval") if "loss" in e]
    change = (f"held-out masked-token loss on the task's text {evals[0]['loss']:.3f} -> "
              f"{evals[-1]['loss']:.3f} (step {evals[0]['step']} -> {evals[-1]['step']}); "
              if len(evals) >= 2 else "")
    return f"{change}fine-tune from it: motian finetune --task {task} --model {out} --out ..."
