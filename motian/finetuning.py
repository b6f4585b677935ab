"""`motian finetune` and `motian evaluate`: fine-tune on a bundled or CLUE task over several
seeds and report mean ± std; evaluate a fine-tuned model on a split and write predictions.

A run directory holds, per seed, `seed-N/result.json` (scores, steps, time), the fine-tuned model
(`seed-N/model`: weights, config, tokenizer.json, task.json) and, for CLUE test files, the
submission file; and for the run `results.json` (resolved settings, the starting weights'
SHA-256, the learning rate and pooling chosen for the model where not given, every seed,
mean ± std, and for classification the majority-class floor) and `results.md`. A seed whose result.json was written with the
same settings is not run again, so an interrupted run resumes at the next unfinished seed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer
from torch import nn

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.errors import UserError
from motian.io import sha256_file, write_json_atomic, write_text_atomic
from motian.model.artifact import (
    RUN_RECORD,
    TaskCard,
    check_vocab,
    find_tokenizer,
    is_hf_bert,
    load_backbone_state,
    model_vocab_hash,
    resolve_model_dir,
    tokenizer_vocab_hash,
)
from motian.model.config import ModelConfig
from motian.model.config import preset as model_preset
from motian.model.heads import MLMHead
from motian.model.io import from_pretrained, load_weights, save_pretrained
from motian.reporting.tables import results_table, summarise
from motian.runtime import pick_device
from motian.task_generation import (
    check_generation_run,
    generate_predictions,
    generation_rows,
    lead_baseline,
    max_new_tokens,
)
from motian.task_training import (
    TaskObjective,
    TaskTraining,
    seed_everything,
    train_on_features,
)
from motian.tasks.builtin import BUILTIN_TASKS, load_builtin
from motian.tasks.clue import clue_name, load_clue, write_submission
from motian.tasks.features import Featurizer
from motian.tasks.heads import SEQ2SEQ_GENERATORS, build_head, predict
from motian.tasks.metrics import (
    accuracy,
    entity_prf,
    generation_scores,
    macro_f1,
    squad_scores,
)
from motian.tasks.types import Example, Task
from motian.tasks.user import USER_TASKS, load_user_task, write_predictions
from motian.train import distributed as dist_utils
from motian.train.distributed import DistInfo
from motian.train.fit import resolve_precision
from motian.train.settings import OptimSettings, RunSettings

DEFAULT_SEEDS = [1, 2, 3]


def load_task(name: str, data: Path | None = None,
              scheme: Literal["BIO", "BIOES"] = "BIO", own_name: str | None = None) -> Task:
    """A bundled task (reviews-sentiment, pd98-ner, pd98-seg, pd98-headline,
    pd98-headline-gen), a CLUE task read from `data`, or
    the user's own files in `data` (text-classification, text-pair, ner: motian/tasks/user.py),
    named `own_name` (default: the directory's name)."""
    if own_name is not None and name not in USER_TASKS:
        raise UserError(f"--name {own_name!r}: only your own tasks take a name (--task "
                        f"{', '.join(USER_TASKS)}); {name!r} has its own")
    if name in BUILTIN_TASKS:
        return load_builtin(name, scheme)
    if name in USER_TASKS:
        task = load_user_task(name, data, own_name)
        task.scheme = scheme
        return task
    if clue_name(name) is None:
        raise UserError(f"unknown task {name!r}; bundled tasks: {', '.join(BUILTIN_TASKS)}; "
                        "CLUE tasks: afqmc, tnews, iflytek, ocnli, cmnli, cluewsc2020, csl, "
                        "cluener, cmrc2018, c3, chid (with --data DIR); your own files: "
                        f"{', '.join(USER_TASKS)} (with --data DIR)")
    if data is None:
        raise UserError(f"CLUE task {name!r} needs --data: the directory holding its files")
    task = load_clue(name, data)
    if task.type == "token":
        task.scheme = scheme
    return task


def load_card_task(card: TaskCard, data: Path | None = None) -> Task:
    """The task a fine-tuned model's card names, read again: your own task by its format and
    under its own name, any other by its name."""
    if card.format:
        return load_task(card.format, data, card.scheme, own_name=card.name)
    if card.name in USER_TASKS:  # a card from before own tasks had names: keep its name
        return load_task(card.name, data, card.scheme, own_name=card.name)
    return load_task(card.name, data, card.scheme)


def score(task: Task, examples: list[Example], predictions: list) -> dict[str, float]:
    """The task type's metrics (fractions in [0, 1]) of `predictions` against gold."""
    if task.type in ("single", "pair"):
        gold = [e.label for e in examples]
        return {"accuracy": accuracy(gold, predictions),
                "macro_f1": macro_f1(gold, predictions, len(task.labels))}
    if task.type == "choice":
        return {"accuracy": accuracy([e.label for e in examples], predictions)}
    if task.type == "token":
        return entity_prf([e.entities for e in examples], predictions)
    if task.type == "generation":
        return generation_scores([e.target for e in examples], predictions)
    return squad_scores([[a for a, _ in e.answers] for e in examples], predictions)


# --------------------------------------------------------------------------- models


def load_start(task: Task, model: Path | None, preset: str, vocab_size: int,
               random_init: bool = False, overrides: dict | None = None
               ) -> tuple[nn.Module, dict, dict[str, torch.Tensor]]:
    """(task model, description of its starting weights, MLM-head weights if any).
    `random_init` keeps the checkpoint's shape but not its weights: the control arm of a
    "does pretraining help" comparison. `overrides` replaces ModelConfig fields that do not
    change the weights' shapes (classifier_pooling, dropout, attention_dropout)."""
    if model is None:
        config = model_preset(preset, vocab_size=vocab_size)
        config = replace(config, **(overrides or {}))
        return build_head(task, config), {"source": f"random init ({preset})"}, {}
    model = Path(model)
    state, config, weights, description = load_backbone_state(model)
    info = {"source": description}
    if vocab_size > config.vocab_size:
        raise UserError(f"{model}: the tokenizer has {vocab_size} tokens but the model only "
                        f"{config.vocab_size}; use the tokenizer the model was trained with")
    config = replace(config, **(overrides or {}))
    pretrained_head = start_facts(model, preset, vocab_size)[1]
    head = build_head(task, config, pretrained_head)
    if random_init:  # no weights, hence no hash: the result does not depend on them
        return head, {"source": f"random init, shape of {model}"}, {}
    report = load_weights(head, state, str(model), quiet=True)
    missing = [k for k in report.missing if k.startswith("backbone.")
               or pretrained_head in SEQ2SEQ_GENERATORS]  # + their LM head / decoder
    if missing or report.mismatched:
        raise UserError(f"{model}: backbone weights did not load: "
                        f"{', '.join((missing + report.mismatched)[:6])}")
    if weights is not None:
        info["sha256"] = sha256_file(weights)
    mlm = {k[4:]: v for k, v in state.items() if k.startswith("mlm.")}
    return head, info, mlm


# --------------------------------------------------------------------------- defaults by model

# The peak fine-tuning rate when --lr is not given, by the model's width: the first row whose
# bound is not below `hidden`. Width 128 is measured here (the demo model, docs/finetune.md:
# 1e-3 against BERT's 5e-5); the wider rows are the rates published for models of that width.
LR_BY_HIDDEN: tuple[tuple[float, float, str], ...] = (
    (128, 1e-3, "measured for this width, docs/finetune.md"),
    (256, 3e-4, "ELECTRA-small's rate at this width"),
    (512, 1e-4, "within the rates BERT's small models were tuned with"),
    (768, 5e-5, "BERT-base's rate"),
    (float("inf"), 2e-5, "BERT-large's rate"),
)
# A [CLS] trained by a pair task is what BERT's classifiers read; below this width the token
# mean measured better even after sentence-order pretraining (docs/finetune.md, hidden 128).
CLS_MIN_HIDDEN = 256
POOLED_TYPES = ("single", "pair", "choice")  # whose heads pool the sequence into one vector


def start_facts(model: Path | None, preset: str, vocab_size: int
                ) -> tuple[ModelConfig, str | None, bool | None]:
    """(config, head, pair-trained) of the starting point, read from its config files without
    loading weights. `head` is the motian head class the checkpoint was saved as ("BERT" for a
    Hugging Face BERT, None for random initialisation); pair-trained says whether its
    pretraining trained [CLS] with a pair task (the head, else the pretraining run's recipe;
    None when nothing says)."""
    if model is None:
        return model_preset(preset, vocab_size=vocab_size), None, None
    model = Path(model)
    if is_hf_bert(model):
        from motian.model.hf import config_from_bert

        hf = json.loads((model / "config.json").read_text(encoding="utf-8"))
        return config_from_bert(hf, str(model)), "BERT", _hf_pooler(model, hf)
    directory = resolve_model_dir(model)
    meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config, head = ModelConfig.from_dict(meta["model"]), meta.get("head")
    if head == "PreTrainingModel":
        return config, head, True
    if head in ("MaskedLM", "CausalLM"):
        return config, head, False
    for run_dir in (directory, *directory.resolve().parents[:2]):  # a bare backbone: its run
        if (run_dir / RUN_RECORD).is_file():
            recipe = json.loads((run_dir / RUN_RECORD).read_text("utf-8")).get("recipe") or {}
            pair_task = (recipe.get("data") or {}).get("pair_task")
            if pair_task is not None:
                return config, head, pair_task != "none"
    return config, head, None


def _hf_pooler(directory: Path, hf: dict) -> bool:
    """Whether a Hugging Face BERT was pretrained with next-sentence prediction: its pooler
    (the dense layer NSP trains on [CLS]) is saved, or it is a BertForPreTraining."""
    names: list[str] = []
    if (directory / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            names = list(f.keys())
    elif (directory / "model.safetensors.index.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text("utf-8"))
        names = list(index.get("weight_map", {}))
    return any("pooler.dense" in n for n in names) or \
        "BertForPreTraining" in (hf.get("architectures") or [])


def count_parameters(config: ModelConfig) -> int:
    """Parameters of the encoder `config` describes (built on the meta device: no memory)."""
    from motian.model import MotianModel

    with torch.device("meta"):
        return sum(p.numel() for p in MotianModel(config).parameters())


def choose_defaults(task_type: str, model: Path | None, preset: str, vocab_size: int,
                    random_init: bool, lr: float, pooling: str | None) -> dict:
    """The learning rate and pooling a run uses, each {"value", "chosen": "given" | "auto",
    "why"}: what the user set, else what fits the starting model (`LR_BY_HIDDEN` by its width;
    for pooled heads, [CLS] only where a pair task trained it at a width where it pays, the
    mean of the tokens otherwise). Pooling is absent for task types that do not pool."""
    if lr < 0:
        raise UserError(f"--lr {lr}: a learning rate is positive (0 = chosen for the model)")
    out: dict[str, dict] = {}
    config = head = pair_trained = None
    if not lr or (pooling is None and task_type in POOLED_TYPES):
        config, head, pair_trained = start_facts(model, preset, vocab_size)
    if lr:
        out["lr"] = {"value": lr, "chosen": "given", "why": "--lr"}
    else:
        _, value, source = next(row for row in LR_BY_HIDDEN if config.hidden <= row[0])
        size = f"{count_parameters(config) / 1e6:.1f}M parameters"
        out["lr"] = {"value": value, "chosen": "auto",
                     "why": f"hidden {config.hidden}, {config.layers} layers, {size}: {source}"}
    if pooling is not None:
        out["pooling"] = {"value": pooling, "chosen": "given", "why": "--pooling"}
    elif task_type in POOLED_TYPES:
        value, why = _auto_pooling(config, head, pair_trained)
        if random_init and model is not None:
            why += " (the random-init control keeps the checkpoint's settings)"
        out["pooling"] = {"value": value, "chosen": "auto", "why": why}
    return out


def _auto_pooling(config: ModelConfig, head: str | None, pair_trained: bool | None
                  ) -> tuple[str, str]:
    if head in ("SequenceClassification", "MultipleChoice"):
        return config.classifier_pooling, "what the fine-tuned model's head read"
    if config.classifier_pooling == "mean":
        return "mean", "the model's own classifier_pooling"
    if head is None:  # nothing pretrained: [CLS] learns with the task (memorises faster here)
        return "cls", "random initialisation: [CLS] trains with the task, as BERT's"
    if pair_trained and config.hidden >= CLS_MIN_HIDDEN:
        return "cls", "[CLS] was trained by the pair task of its pretraining"
    if pair_trained:
        return "mean", (f"[CLS] was trained by a pair task, but below hidden {CLS_MIN_HIDDEN} "
                        "the token mean measured better (docs/finetune.md)")
    if pair_trained is False:
        return "mean", "MLM-only pretraining never trained [CLS]"
    return "mean", "nothing says its pretraining trained [CLS]"


def defaults_line(chosen: dict) -> str | None:
    """The one line that says what was chosen for the user, or None when they set it all."""
    auto = [f"{name} {_show(c['value'])} ({c['why']})" for name, c in chosen.items()
            if c["chosen"] == "auto"]
    if not auto:
        return None
    options = " / ".join(f"--{name}" for name, c in chosen.items() if c["chosen"] == "auto")
    return f"motian: chose {'; '.join(auto)}; set {options} to override"


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- baselines


def majority_class(task: Task, train: list[Example], evals: dict[str, list[Example]]
                   ) -> dict | None:
    """For classification (single, pair): the most frequent training label (the lowest index
    on a tie) and the scores of always predicting it on each labelled evaluation split: the
    floor a model must clear to have learned anything. None for other task types."""
    if task.type not in ("single", "pair"):
        return None
    counts = Counter(e.label for e in train if e.label is not None)
    if not counts:
        return None
    label = min(counts, key=lambda k: (-counts[k], k))
    out: dict = {"label": task.labels[label] if label < len(task.labels) else str(label),
                 "train_share": counts[label] / sum(counts.values())}
    for split, examples in evals.items():
        if examples and _all_gold(task, examples):
            out[split] = score(task, examples, [label] * len(examples))
    return out


def require_scored_split(task: Task, data: Path | None, max_eval: int | None) -> None:
    """Refuse, before any training, a run with nothing to score: your own task without its
    dev file (or with an empty one), or any task without a labelled dev or test split."""
    if task.format:
        from motian.tasks.user import FORMATS

        path = Path(data) / "dev.jsonl"
        what = "not found" if "dev" not in task.splits else "has no records"
        if not task.splits.get("dev"):
            raise UserError(f"{path}: {what}; finetune scores every seed on labelled dev "
                            f"records, one {FORMATS[task.format]} per line: put some of your "
                            "labelled data there (e.g. 10%, taken out of train.jsonl), then "
                            "run again")
    if not any(_all_gold(task, subset(task.splits.get(split, []), max_eval))
               for split in ("dev", "test")):
        raise UserError(f"{task.name}: no dev or test split with an answer on every record, so "
                        "fine-tuning would have nothing to score; give labelled dev records "
                        "(and test records, if you have them)")


# --------------------------------------------------------------------------- the verbs


def subset(examples: list[Example], limit: int | None) -> list[Example]:
    """`limit` examples chosen by a hash of their ids (a stable pseudo-random sample: the
    bundled splits are in file order, whose head is all one label or one month's first days),
    kept in their original order."""
    if limit is None or limit >= len(examples):
        return examples
    rank = sorted(range(len(examples)),
                  key=lambda i: hashlib.sha1(examples[i].guid.encode()).digest())
    return [examples[i] for i in sorted(rank[:limit])]


def _evaluate_split(model: nn.Module, task: Task, split: str, examples: list[Example],
                    featurize: Featurizer, pad: int, device: torch.device, batch_size: int,
                    out_dir: Path, precision: str = "fp32", write: bool = True
                    ) -> tuple[dict[str, float] | None, Path | None]:
    """Scores of a labelled split; for an unlabelled CLUE split, the submission file. The
    user's own tasks always get their predictions file (under their label names), scored or
    not: that file is what they came for. With `write` false nothing is written."""
    if task.type == "generation":  # decoded token by token (greedy), not read off one pass
        predictions = generate_predictions(model, task, examples, featurize, device, batch_size)
    else:
        predictions = predict(model, task, featurize(examples), examples, pad, device,
                              batch_size, precision)
    scores = score(task, examples, predictions) if _all_gold(task, examples) else None
    if not write:
        return scores, None
    if task.format:
        return scores, write_predictions(task, examples, predictions, out_dir, split)
    if scores is None and task.clue:  # CLUE's submission name only for the test split
        return None, write_submission(task, examples, predictions, out_dir, split)
    return scores, None


def _all_gold(task: Task, examples: list[Example]) -> bool:
    probe = Task(task.name, task.type, splits={"x": examples})
    return probe.labelled("x")


def open_tokenizer(model: Path | None, tokenizer: Path | None, allow_vocab_mismatch: bool
                   ) -> tuple[Path, Tokenizer, dict[str, int]]:
    """(path, tokenizer, special token ids) a run uses: `tokenizer`, else the model's own,
    refused when its vocabulary is not the one the model was trained with (unless allowed)."""
    tok_path = find_tokenizer(model, tokenizer)
    tok = load_tokenizer(tok_path)
    if model is not None:
        check_vocab(model_vocab_hash(resolve_model_dir(Path(model))), tokenizer_vocab_hash(tok),
                    model, tok_path, allow_vocab_mismatch)
    return tok_path, tok, special_token_ids(tok)


def resolve_defaults(task_type: str, model: Path | None, preset: str, vocab_size: int,
                     random_init: bool, optim: OptimSettings, pooling: str | None,
                     dropout: float | None, info: DistInfo
                     ) -> tuple[dict, OptimSettings, dict]:
    """(`choose_defaults`' record, the optimiser with its rate, the ModelConfig overrides:
    pooling and dropout); rank 0 prints what was chosen for the user."""
    chosen = choose_defaults(task_type, model, preset, vocab_size, random_init, optim.lr,
                             pooling)
    optim = replace(optim, lr=chosen["lr"]["value"])
    pooling = chosen["pooling"]["value"] if "pooling" in chosen else pooling
    line = defaults_line(chosen)
    if line and info.is_main:
        print(line, file=sys.stderr, flush=True)
    overrides = {k: v for k, v in (("classifier_pooling", pooling), ("dropout", dropout),
                                   ("attention_dropout", dropout)) if v is not None}
    return chosen, optim, overrides


def finished_seed(seed_dir: Path, config: dict, seed: int, info: DistInfo) -> dict | None:
    """The result of a seed finished earlier with the same `config` (seed_dir/result.json),
    else None, with `seed_dir` made (rank 0)."""
    done = seed_dir / "result.json"
    if done.is_file():
        previous = json.loads(done.read_text("utf-8"))
        if previous.get("config") == config:
            if info.is_main:
                print(f"seed {seed}: finished earlier, reusing {done}", file=sys.stderr)
            return previous["result"]
    if info.is_main:
        seed_dir.mkdir(parents=True, exist_ok=True)
    return None


def evaluate_splits(model: nn.Module, task: Task, featurize: Featurizer, pad: int,
                    max_eval: int | None, device: torch.device, out_dir: Path, precision: str,
                    write: bool) -> dict:
    """{split: scores} of the labelled dev and test splits (at most `max_eval` examples each),
    and {split_submission / split_predictions: path} for the files written (`_evaluate_split`)."""
    out: dict = {}
    for split in ("dev", "test"):
        examples = subset(task.splits.get(split, []), max_eval)
        if not examples:
            continue
        scores, submission = _evaluate_split(model, task, split, examples, featurize, pad,
                                             device, 64, out_dir, precision, write=write)
        if scores is not None:
            out[split] = scores
        if submission is not None:
            kind = "predictions" if task.format else "submission"
            out[f"{split}_{kind}"] = str(submission)
    return out


@dist_utils.in_process_group
def finetune(task: str, out: Path, model: Path | None = None, tokenizer: Path | None = None,
             data: Path | None = None, preset: str = "tiny", seeds: list[int] | None = None,
             max_length: int = 128, scheme: Literal["BIO", "BIOES"] = "BIO",
             max_train: int | None = None, max_eval: int | None = None,
             random_init: bool = False, save_model: bool = True,
             pooling: Literal["cls", "mean"] | None = None, dropout: float | None = None,
             checkpoint_every: int = 200, allow_vocab_mismatch: bool = False,
             name: str | None = None, training: TaskTraining = TaskTraining(),
             optim: OptimSettings = OptimSettings(lr=0.0),
             run: RunSettings = RunSettings(), *, info: DistInfo) -> dict:
    """Fine-tune a model on a task with several seeds; report dev/test mean ± std.

    Writes out/results.json, out/results.md and per seed out/seed-N/ (result.json,
    metrics.jsonl with one record per step, the model, CLUE submission files for unlabelled
    test data). Seeds already finished with the same settings are reused, and an interrupted
    seed continues exactly from its latest checkpoint, so rerunning the command after a crash
    continues where it stopped. Runs alone or on every rank of torchrun (the global batch is
    split across the processes; rank 0 writes).

    Args:
        task: reviews-sentiment, pd98-ner, pd98-seg, pd98-headline, pd98-headline-gen
            (headline generation: needs a causal --model); a CLUE task (afqmc, tnews,
            iflytek, ocnli, cmnli, cluewsc2020, csl, cluener, cmrc2018, c3, chid) with --data; or your
            own JSON lines with --data: text-classification ({"text", "label"}), text-pair
            ({"text_a", "text_b", "label"}), ner ({"text", "entities": [[start, end, type]]}).
        out: run directory.
        model: starting weights: a motian checkpoint or training run (e.g.
            runs/demo/pretrain/final), or a Hugging Face BERT directory; none = random
            initialisation of --preset.
        tokenizer: tokenizer directory / tokenizer.json / vocab.txt (default: the model's own,
            found in its directory, its pretraining run or the data that run recorded).
        data: directory with the task's files (CLUE: train.json, dev.json, test.json, ...;
            your own: train.jsonl, dev.jsonl, test.jsonl).
        preset: model shape for random initialisation (tiny, small, base, ...).
        seeds: random seeds, one fine-tuning run each (default 1 2 3).
        max_length: tokens per input sequence.
        scheme: tagging scheme for token tasks (pd98-seg always uses BIOES = BMES).
        max_train: use only N training examples (a stable hash sample).
        max_eval: use only N dev and test examples.
        random_init: with --model, keep its shape and tokenizer but start from random weights
            (the control for measuring what pretraining buys).
        save_model: keep each seed's fine-tuned model.
        pooling: what classification, pair and multiple-choice heads read: cls ([CLS], as
            BERT) or mean (the mean over real tokens; measured better from an MLM-only
            checkpoint, see docs/finetune.md); default: chosen for the model (cls where a
            pair task trained its [CLS] and it is at least 256 wide, or with no pretrained
            weights; else mean), printed and stored with the results. Saved with the model;
            a mean-pooled model exports to Hugging Face as remote code, not BERT.
        dropout: dropout on hidden states and attention weights while fine-tuning (default:
            the model's own; the demo recipe pretrains with 0, BERT with 0.1).
        allow_vocab_mismatch: use a tokenizer with another vocabulary than the model was
            trained with (refused by default: token ids would mean other tokens).
        checkpoint_every: optimizer steps between checkpoints of a seed (0 = only at its end);
            how it runs, not the result.
        name: your own task's name (text-classification, text-pair, ner), for its results,
            report group, task card and prediction files; default: the --data directory's name.
        training: epochs, batch size, warm-up and the fine-tuning techniques.
        optim: the optimiser (adamw, or lamb for very large batches) and its settings. --lr 0
            (the default) chooses the rate for the model's width (1e-3 at hidden 128 down to
            2e-5 above 768; printed and stored with the results).
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    out, seeds = Path(out), list(seeds or DEFAULT_SEEDS)
    the_task = load_task(task, data, scheme, own_name=name)
    if not the_task.splits.get("train"):
        raise UserError(f"{task}: the training split is empty")
    require_scored_split(the_task, data, max_eval)
    if the_task.type == "generation":
        check_generation_run(the_task, model, training.aux_mlm)
    tok_path, tok, special = open_tokenizer(model, tokenizer, allow_vocab_mismatch)
    chosen, optim, overrides = resolve_defaults(the_task.type, model, preset,
                                                tok.get_vocab_size(), random_init, optim,
                                                pooling, dropout, info)
    _, start_info, _ = load_start(the_task, model, preset, tok.get_vocab_size(), random_init,
                                  overrides)
    config = {"task": the_task.name, "model": str(model) if model else None,
              "model_sha256": start_info.get("sha256"), "tokenizer": str(tok_path),
              "preset": None if model else preset, "random_init": random_init,
              **({"model_overrides": overrides} if overrides else {}),
              "max_length": max_length,
              "scheme": the_task.scheme, "max_train": max_train, "max_eval": max_eval,
              **settings_record(training, optim)}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    featurize = Featurizer(the_task, tok, special, max_length)
    train_examples = subset(the_task.splits["train"], max_train)
    train_features = featurize(train_examples)
    shared = _Seeds(the_task, config, training, optim, run, info, model, preset, tok, special,
                    featurize, train_features, max_eval, save_model, checkpoint_every)
    runs = [shared.run(seed, out / f"seed-{seed}") for seed in seeds]
    result = {"task": {"name": the_task.name, "type": the_task.type,
                       **({"format": the_task.format} if the_task.format else {}),
                       "sizes": {**the_task.sizes(), "train_used": len(train_examples)},
                       "notes": the_task.notes},
              "model": start_info, "config": config, "defaults": chosen, "runs": runs,
              "summary": summarise(runs)}
    majority = majority_class(the_task, train_examples, {
        split: subset(the_task.splits.get(split, []), max_eval) for split in ("dev", "test")})
    if majority is not None:
        result["majority_class"] = majority
    if the_task.type == "generation":  # the floor of a generation result, as majority is above
        result["decoding"] = {"method": "greedy", "stop": "[SEP]",
                              "max_new_tokens": max_new_tokens(the_task, featurize)}
        result["lead_baseline"] = lead_baseline(train_examples, {
            split: subset(the_task.splits.get(split, []), max_eval) for split in ("dev", "test")})
    if info.is_main:
        write_json_atomic(out / "results.json", result)
        write_text_atomic(out / "results.md", results_table(result))
        print((out / "results.md").read_text(encoding="utf-8").split("Resolved settings")[0])
    return result


def settings_record(training: TaskTraining, optim: OptimSettings) -> dict:
    """The settings a result is reused by, flat: the task training's and the optimiser's
    (its name under "optimizer")."""
    record = {**asdict(training), **asdict(optim)}
    record["optimizer"] = record.pop("name")
    record["betas"] = list(record["betas"])
    if record["decay"] != "stlr":  # unused: results and checkpoints are reused as before
        record.pop("cut_frac")
        record.pop("ratio")
    return record


def fingerprint(config: dict, seed: int) -> str:
    """A seed's checkpoints belong to these settings and this seed only."""
    text = json.dumps({"config": config, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Seeds:
    """What every seed of a fine-tuning run shares, and `run(seed)`."""

    def __init__(self, task: Task, config: dict, training: TaskTraining, optim: OptimSettings,
                 run: RunSettings, info: DistInfo, model_path: Path | None, preset: str,
                 tok: Tokenizer, special: dict[str, int], featurize: Featurizer,
                 train_features: list, max_eval: int | None, save_model: bool,
                 checkpoint_every: int):
        self.task, self.config, self.training, self.optim = task, config, training, optim
        self.run_settings, self.info, self.model_path, self.preset = run, info, model_path, \
            preset
        self.tok, self.special, self.featurize = tok, special, featurize
        self.train_features, self.max_eval, self.save_model = train_features, max_eval, \
            save_model
        self.checkpoint_every = checkpoint_every

    def run(self, seed: int, seed_dir: Path) -> dict:
        task, config, info = self.task, self.config, self.info
        previous = finished_seed(seed_dir, config, seed, info)
        if previous is not None:
            return previous
        seed_everything(seed)
        model, _, mlm_state = load_start(task, self.model_path, self.preset,
                                         self.tok.get_vocab_size(), config["random_init"],
                                         config.get("model_overrides"))
        mlm = None
        if self.training.aux_mlm:
            mlm = MLMHead(model.config)
            if mlm_state:
                mlm.load_state_dict(mlm_state)
        model.vocab_hash = tokenizer_vocab_hash(self.tok)  # saved with the fine-tuned model
        objective = TaskObjective(model, task.type, self.training, self.special, mlm,
                                  prepare=generation_rows(model, task, self.featurize))
        t0 = time.perf_counter()
        stats = train_on_features(objective, self.train_features, task.type, self.special["pad"],
                                  self.training, self.optim, self.run_settings, info, seed,
                                  seed_dir, fingerprint(config, seed), self.checkpoint_every,
                                  f"{task.name} seed {seed}", config["max_length"])
        device, precision = info.device, self.run_settings.precision
        result: dict = {"seed": seed, "train_seconds": round(time.perf_counter() - t0, 2),
                        "precision": resolve_precision(precision, device),
                        "steps": stats["steps"], "final_loss": stats["final_loss"],
                        "skipped_steps": stats["skipped_steps"]}
        # Every rank evaluates (no rank waits on another's evaluation); rank 0 writes.
        result.update(evaluate_splits(model, task, self.featurize, self.special["pad"],
                                      self.max_eval, device, seed_dir, precision, info.is_main))
        if info.is_main:
            if self.save_model:
                save_fine_tuned(model, task, self.tok, config["max_length"], seed_dir / "model")
            write_json_atomic(seed_dir / "result.json", {"config": config, "result": result})
            remove_checkpoints(seed_dir)  # the seed is done: its model and result are kept
        return result


def remove_checkpoints(run_dir: Path) -> None:
    import shutil

    from motian.train.checkpoint import CHECKPOINTS

    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


def save_fine_tuned(model: nn.Module, task: Task, tok: Tokenizer, max_length: int,
                    directory: Path) -> Path:
    """The model plus what `evaluate` needs to use it alone: tokenizer.json and task.json."""
    save_pretrained(model, directory)
    tok.save(str(directory / "tokenizer.json"))
    TaskCard(name=task.name, type=task.type, labels=task.labels, scheme=task.scheme,
             clue=task.clue, max_length=max_length, format=task.format).write(directory)
    return directory


def evaluate(model: Path, split: Literal["train", "dev", "test"] = "dev",
             data: Path | None = None, out: Path | None = None, max_eval: int | None = None,
             batch_size: int = 64, device: str = "auto", num_beams: int = 1) -> dict:
    """Score a fine-tuned model on a split, or write predictions where the split is unlabelled.

    Args:
        model: a fine-tuned model directory (out/seed-N/model of `motian finetune`).
        split: which split of the task to evaluate.
        data: directory with the task's files (CLUE tasks and your own).
        out: where predictions go (default: the model directory); a CLUE task's test split
            gets CLUE's submission file name (afqmc_predict.json, ...), its other splits
            <task>_<split>_predictions.json (a dev run never replaces a test submission),
            other tasks <task>_<split>_predictions.jsonl.
        max_eval: use only the first N examples.
        batch_size: examples per forward pass.
        device: auto, cpu or cuda.
        num_beams: generation tasks: beam search with this many beams (1: greedy, as
            `finetune` scores).
    """
    model = Path(model)
    card = TaskCard.read(model)
    task = load_card_task(card, data)
    card.check_labels(task.labels, model)
    examples = subset(task.splits.get(split, []), max_eval)
    if not examples:
        raise UserError(f"{task.name}: no {split} split found")
    tok = load_tokenizer(model / "tokenizer.json")
    special = special_token_ids(tok)
    dev = pick_device(device)
    net = from_pretrained(model).to(dev)
    featurize = Featurizer(task, tok, special, card.max_length)
    if task.type == "generation":
        predictions = generate_predictions(net, task, examples, featurize, dev, batch_size,
                                           num_beams)
    else:
        predictions = predict(net, task, featurize(examples), examples, special["pad"], dev,
                              batch_size)
    result: dict = {"task": task.name, "split": split, "examples": len(examples),
                    "model_sha256": sha256_file(model / "model.safetensors")}
    target = Path(out) if out else model
    if _all_gold(task, examples):
        result["scores"] = score(task, examples, predictions)
        print(f"{task.name} {split}: " + ", ".join(
            f"{k} {v * 100:.2f}" for k, v in result["scores"].items()))
    if task.clue:
        result["predictions"] = str(write_submission(task, examples, predictions, target,
                                                     split))
    elif task.format:
        result["predictions"] = str(write_predictions(task, examples, predictions, target,
                                                      split))
    else:
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{task.name}_{split}_predictions.jsonl"
        write_text_atomic(path, "".join(
            json.dumps({"id": e.guid, "prediction": p}, ensure_ascii=False) + "\n"
            for e, p in zip(examples, predictions)))
        result["predictions"] = str(path)
    return result
