"""`motian early-exit` and `motian early-exit-curve`: FastBERT's adaptive inference for a
fine-tuned sequence classifier (Liu et al. 2020, arXiv:2004.02178; the model is
motian/model/early_exit.py).

`early_exit` follows FastBERT's recipe in two steps, the first being `motian finetune` as usual:
the backbone and the fine-tuned classifier (the teacher) are frozen, and a student classifier
after every lower block learns to predict what the teacher predicts, by self-distillation:
the mean over the students of KL(student || teacher), the direction FastBERT writes. Only the
students train and no label is read, so any text of the task serves (here its training split).
The backbone runs without gradients, so a step costs about one forward pass.

Then the speed/accuracy curve: for each threshold on the normalised entropy, the accuracy, the
mean number of blocks run and the measured wall time per sample. Every row's exit point is
read off one full-depth pass (all heads on all rows), and the wall time of each threshold is
measured by running the early-exit forward itself (rows that left dropped from later blocks)
over the split; the predictions of that run are checked against the ones read off. The
default threshold is chosen on the dev split, the test split reports: the threshold that runs
the fewest blocks while staying within `max_drop` of the full model's dev accuracy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.errors import UserError
from motian.finetuning import (
    fingerprint,
    load_card_task,
    remove_checkpoints,
    save_fine_tuned,
    subset,
)
from motian.io import sha256_file, write_json_atomic
from motian.model.artifact import TaskCard, load_task_model
from motian.model.early_exit import (
    EarlyExitClassification,
    check_threshold,
    normalised_entropy,
)
from motian.model.heads import SequenceClassification
from motian.model.io import from_pretrained, load_weights
from motian.runtime import pick_device
from motian.task_training import TaskTraining, seed_everything, train_on_features
from motian.tasks.features import Feature, Featurizer, collate
from motian.tasks.metrics import accuracy
from motian.tasks.types import Task
from motian.train import distributed as dist_utils
from motian.train.distributed import DistInfo
from motian.train.fit import Objective
from motian.train.settings import OptimSettings, RunSettings

DEFAULT_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
REPORT = "early_exit.json"
TRAINING = "exits-training"  # metrics of the students' training, inside the model directory


# --------------------------------------------------------------------------- the model


def exit_model(model: Path, task: str | None = None
               ) -> tuple[EarlyExitClassification, TaskCard]:
    """The fine-tuned classifier at `model` with a student head per lower block (an early-exit
    model is taken as it is, its students trained further), and its task card."""
    net, card = load_task_model(model)
    if task is not None and task not in (card.name, card.format):
        raise UserError(f"{model}: fine-tuned on {card.name!r}, not {task!r}; train the exits "
                        "on the model's own task or give a model fine-tuned on this one")
    if isinstance(net, EarlyExitClassification):
        return net, card
    if type(net) is not SequenceClassification or card.type not in ("single", "pair"):
        raise UserError(f"{model}: a {type(net).__name__} model fine-tuned on a {card.type} "
                        "task; early exit needs a sequence classifier: fine-tune one with "
                        "`motian finetune` on a single-text or text-pair classification task "
                        "(e.g. --task reviews-sentiment) and give its seed-N/model")
    exits = EarlyExitClassification(net.config, net.num_labels)  # UserError for regression
    report = load_weights(exits, net.state_dict(), str(model), quiet=True)
    if report.unexpected or report.mismatched or \
            any(not k.startswith("exits.") for k in report.missing):
        raise UserError(report.summary())
    exits.vocab_hash = getattr(net, "vocab_hash", None)
    return exits, card


def exit_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(student || teacher) = sum p_s (log p_s - log p_t), the mean over rows (FastBERT)."""
    s, t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    return (s.exp() * (s - t)).sum(-1).mean()


class ExitDistillation(Objective):
    """The students' self-distillation loss; the backbone and the teacher head are frozen (no
    gradients, no dropout), so only `model.exits` train."""

    def __init__(self, model: EarlyExitClassification):
        super().__init__()
        self.model = model
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.backbone.eval()
        self.model.head.eval()
        return self

    def units(self, batch: dict[str, Tensor]) -> float:
        return float(batch["input_ids"].shape[0])

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean over the students of their KL to the teacher on `batch` (labels unread)."""
        m, mask = self.model, batch["attention_mask"]
        with torch.no_grad():
            states = m.block_states(batch["input_ids"], mask, batch.get("token_type_ids"))
            teacher = m.head(states[-1], mask)
        return torch.stack([exit_kl(head(h, mask), teacher)
                            for head, h in zip(m.exits, states)]).mean()

    def forward(self, batch: dict[str, Tensor], units_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        n = self.units(batch)
        loss = self.loss(batch)
        return loss * (n / units_per_rank), {"loss_sum": loss.detach() * n,
                                             "units": torch.tensor(n)}


# --------------------------------------------------------------------------- the curve


@torch.inference_mode()
def exit_table(model: EarlyExitClassification, batches: list[dict[str, Tensor]]
               ) -> tuple[Tensor, Tensor]:
    """(normalised entropy, predicted class), each (N, blocks): every head on every row."""
    model.eval()
    ent, pred = [], []
    for batch in batches:
        logits = model.exit_logits(batch["input_ids"], batch["attention_mask"],
                                   batch.get("token_type_ids"))
        ent.append(torch.stack([normalised_entropy(x) for x in logits], 1).cpu())
        pred.append(torch.stack([x.argmax(-1) for x in logits], 1).cpu())
    return torch.cat(ent), torch.cat(pred)


def exits_at(ent: Tensor, threshold: float) -> Tensor:
    """(N,) the block (0-based) each row leaves at: the first whose entropy is below
    `threshold`, else the last."""
    below = ent < threshold
    below[:, -1] = True
    return below.int().argmax(1)


@torch.inference_mode()
def timed_run(model: EarlyExitClassification, batches: list[dict[str, Tensor]],
              threshold: float) -> tuple[list[int], list[int], float]:
    """(predictions, blocks run per row, seconds) of the early-exit forward at `threshold`."""
    model.eval()
    before = model.exit_threshold
    model.set_threshold(threshold)
    preds, layers = [], []
    try:
        start = time.perf_counter()
        for batch in batches:
            out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            preds += out.logits.argmax(-1).tolist()
            layers += out.exit_layers.tolist()
        seconds = time.perf_counter() - start
    finally:
        model.set_threshold(before)
    return preds, layers, seconds


def curve(model: EarlyExitClassification, features: list[Feature], gold: list[int],
          task_type: str, pad: int, thresholds: list[float], device: torch.device,
          batch_size: int = 32, repeats: int = 1) -> list[dict]:
    """One row per threshold: accuracy, mean blocks run, and unless `repeats` is 0 the
    measured ms per sample (the fastest of `repeats` passes, the thresholds taken in turn so
    that a busy machine slows them alike) and how many rows of the real run differ (in
    prediction or exit block) from the ones read off."""
    batches = [{k: v.to(device) for k, v in collate(task_type, features[i:i + batch_size],
                                                     pad).items() if k != "labels"}
               for i in range(0, len(features), batch_size)]
    ent, pred = exit_table(model, batches)
    n = ent.shape[1]
    rows = []
    for t in thresholds:
        at = exits_at(ent, t)
        chosen = pred.gather(1, at[:, None]).squeeze(1)
        rows.append({"threshold": t, "accuracy": accuracy(gold, chosen.tolist()),
                     "mean_layers": float(at.float().mean()) + 1, "layers": n,
                     "exits_per_layer": torch.bincount(at, minlength=n).tolist()})
        if repeats:
            real, layers, _ = timed_run(model, batches, t)
            rows[-1]["differs_from_read_off"] = int(((torch.tensor(real) != chosen)
                                                     | (torch.tensor(layers) != at + 1)).sum())
    for _ in range(repeats):
        for row in rows:
            ms = 1000 * timed_run(model, batches, row["threshold"])[2] / len(features)
            row["ms_per_sample"] = min(ms, row.get("ms_per_sample", ms))
    return rows


def choose_threshold(rows: list[dict], max_drop: float) -> tuple[float, str]:
    """The threshold running the fewest blocks within `max_drop` of the full model's accuracy
    (the threshold-0 row), and why."""
    full = next((r for r in rows if r["threshold"] == 0.0), None)
    if full is None:
        raise UserError("--thresholds must include 0 (the full model) to choose a threshold")
    fits = [r for r in rows if r["accuracy"] >= full["accuracy"] - max_drop - 1e-12]
    best = min(fits, key=lambda r: (r["mean_layers"], -r["accuracy"]))
    return best["threshold"], (
        f"fewest mean layers ({best['mean_layers']:.2f} of {best['layers']}) within "
        f"{max_drop * 100:g} points of the full model's accuracy ({best['accuracy'] * 100:.2f} "
        f"vs {full['accuracy'] * 100:.2f})")


def curve_table(rows: list[dict], chosen: float | None = None) -> str:
    """The curve as a markdown table; `chosen` marks the model's threshold."""
    base = next((r.get("ms_per_sample") for r in rows if r["threshold"] == 0.0), None)
    lines = ["| threshold | accuracy | mean layers | ms / sample | speed-up |",
             "|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("ms_per_sample")
        mark = " (default)" if chosen is not None and r["threshold"] == chosen else ""
        speed = f"{base / ms:.2f}x" if ms and base else "-"
        lines.append(f"| {r['threshold']:g}{mark} | {r['accuracy'] * 100:.2f} | "
                     f"{r['mean_layers']:.2f} / {r['layers']} | "
                     f"{'-' if ms is None else f'{ms:.3f}'} | {speed} |")
    return "\n".join(lines)


def _check_thresholds(thresholds: list[float] | None) -> list[float]:
    values = list(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    if not values:
        raise UserError("--thresholds: give at least one threshold in [0, 1]")
    return sorted({check_threshold(t, "--thresholds value") for t in values})


class _Split:
    """A labelled split's features and gold labels (one feature per example)."""

    def __init__(self, task: Task, split: str, featurize: Featurizer, max_eval: int | None):
        self.examples = subset(task.splits.get(split, []), max_eval)
        self.features = featurize(self.examples) if self.examples else []
        self.gold = [self.examples[f.example].label for f in self.features]
        self.usable = bool(self.features) and all(g is not None for g in self.gold)


# --------------------------------------------------------------------------- the verbs


@dist_utils.in_process_group
def early_exit(model: Path, out: Path, task: str | None = None, data: Path | None = None,
               epochs: float = 1.0, batch_size: int = 32, warmup: float = 0.1,
               max_train: int | None = None, max_eval: int | None = None,
               thresholds: list[float] | None = None, threshold: float | None = None,
               max_drop: float = 0.01, eval_batch_size: int = 32, repeats: int = 1,
               seed: int = 1,
               checkpoint_every: int = 0, optim: OptimSettings = OptimSettings(lr=1e-3),
               run: RunSettings = RunSettings(), *, info: DistInfo) -> dict:
    """Add FastBERT early exit to a fine-tuned classifier: train a classifier after every
    block by self-distillation from the last one, then measure speed against accuracy.

    Writes `out` as a model directory (config.json with the chosen threshold, weights,
    tokenizer.json, task.json) that `evaluate`, `predict`, `serve` and `export` read like any
    fine-tuned model, plus early_exit.json (the curves, the threshold and why) and
    exits-training/metrics.jsonl. Prints the test curve.

    Args:
        model: a fine-tuned sequence classifier (out/seed-N/model of `motian finetune` on a
            single-text or pair classification task, e.g. reviews-sentiment).
        out: directory for the early-exit model.
        task: the task (default: the model's own; must match it).
        data: directory with the task's files (CLUE tasks and your own).
        epochs: passes over the training texts (labels are not read).
        batch_size: examples per optimizer step.
        warmup: fraction of the steps spent warming up (then linear decay to 0).
        max_train: use only N training examples.
        max_eval: use only N dev and test examples.
        thresholds: normalised-entropy thresholds of the curve (default 0 0.05 0.1 0.2 0.3
            0.4 0.5 0.6 0.8; 0 = the full model).
        threshold: the model's threshold (default: chosen on dev, see max_drop).
        max_drop: the chosen threshold keeps dev accuracy within this of the full model's
            (0.01 = 1 point).
        eval_batch_size: examples per forward pass when measuring the curve.
        repeats: timed passes per threshold (the fastest is kept; 0 = no timing).
        seed: random seed of the students' initialisation and data order.
        checkpoint_every: optimizer steps between checkpoints (0 = only at the end).
        optim: the optimiser of the students.
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    out, model = Path(out), Path(model)
    values = _check_thresholds(thresholds)
    if threshold is not None:
        check_threshold(threshold, "--threshold")
    if not 0.0 <= max_drop <= 1.0:
        raise UserError(f"--max-drop {max_drop}: a fraction of accuracy in [0, 1] (0.01 = 1 "
                        "point)")
    seed_everything(seed)
    net, card = exit_model(model, task)
    the_task = load_card_task(card, data)
    card.check_labels(the_task.labels, model)
    tok = load_tokenizer(model / "tokenizer.json")
    special = special_token_ids(tok)
    featurize = Featurizer(the_task, tok, special, card.max_length or 128)
    train = subset(the_task.splits.get("train", []), max_train)
    if not train:
        raise UserError(f"{the_task.name}: no training texts to train the exits on")
    settings = TaskTraining(epochs=epochs, batch_size=batch_size, warmup=warmup)
    config = {"model": str(model), "model_sha256": sha256_file(model / "model.safetensors"),
              "task": the_task.name, "epochs": epochs, "batch_size": batch_size,
              "warmup": warmup, "max_train": max_train, "lr": optim.lr, "seed": seed}
    run_dir = out / TRAINING
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = train_on_features(ExitDistillation(net), featurize(train), the_task.type,
                              special["pad"], settings, optim, run, info, seed, run_dir,
                              fingerprint(config, seed), checkpoint_every, "early exit",
                              card.max_length or 128)
    result: dict = {"task": the_task.name, "config": config, "layers": net.config.layers,
                    "train": {"seconds": round(time.perf_counter() - t0, 2),
                              "steps": stats["steps"], "final_kl": stats["final_loss"]}}
    if not info.is_main:
        return result
    remove_checkpoints(run_dir)
    dev, test = (_Split(the_task, s, featurize, max_eval) for s in ("dev", "test"))
    pick = dev if dev.usable else test
    if threshold is None:
        if not pick.usable:
            raise UserError(f"{the_task.name}: no labelled dev or test split to choose the "
                            "threshold on; give --threshold")
        rows = curve(net, pick.features, pick.gold, the_task.type, special["pad"], values,
                     info.device, eval_batch_size, repeats=0)
        threshold, why = choose_threshold(rows, max_drop)
        result["dev" if pick is dev else "choice_split"] = rows
        why += f", on {'dev' if pick is dev else 'test (no labelled dev split)'}"
    else:
        why = "given (--threshold)"
    result.update(threshold=threshold, threshold_why=why)
    if test.usable:
        result["test"] = curve(net, test.features, test.gold, the_task.type, special["pad"],
                               sorted({*values, threshold}), info.device, eval_batch_size,
                               repeats)
    net.set_threshold(threshold)
    save_fine_tuned(net, the_task, tok, card.max_length or 128, out)
    write_json_atomic(out / REPORT, result)
    print(f"early exit: threshold {threshold:g} ({why})")
    if "test" in result:
        print(f"{the_task.name} test, batch {eval_batch_size}:\n"
              + curve_table(result["test"], threshold))
    return result


def early_exit_curve(model: Path, split: str = "test", data: Path | None = None,
                     thresholds: list[float] | None = None, max_eval: int | None = None,
                     batch_size: int = 32, repeats: int = 1, device: str = "auto",
                     threads: int = 0) -> dict:
    """Print an early-exit model's speed/accuracy curve on a split: per threshold, accuracy,
    mean blocks run, wall time per sample (the early-exit forward itself, measured).

    Args:
        model: an early-exit model directory (written by `motian early-exit`).
        split: train, dev or test (labelled).
        data: directory with the task's files (CLUE tasks and your own).
        thresholds: the thresholds to measure (default: the standard list and the model's).
        max_eval: use only N examples.
        batch_size: examples per forward pass.
        repeats: timed passes per threshold (the fastest is kept; 0 = no timing).
        device: auto, cpu or cuda.
        threads: CPU threads (0: torch's default).
    """
    model = Path(model)
    card = TaskCard.read(model)
    net = from_pretrained(model)
    if not isinstance(net, EarlyExitClassification):
        raise UserError(f"{model}: a {type(net).__name__} model has no exits; train them with "
                        f"`motian early-exit --model {model} --out DIR` and give DIR")
    if threads:
        torch.set_num_threads(threads)
    the_task = load_card_task(card, data)
    card.check_labels(the_task.labels, model)
    tok = load_tokenizer(model / "tokenizer.json")
    special = special_token_ids(tok)
    part = _Split(the_task, split, Featurizer(the_task, tok, special, card.max_length or 128),
                  max_eval)
    if not part.usable:
        raise UserError(f"{the_task.name}: no labelled {split} split to measure on")
    dev = pick_device(device)
    values = sorted({*_check_thresholds(thresholds), net.exit_threshold})
    rows = curve(net.to(dev), part.features, part.gold, the_task.type, special["pad"], values,
                 dev, batch_size, repeats)
    print(f"{the_task.name} {split}, batch {batch_size}:\n"
          + curve_table(rows, net.exit_threshold), file=sys.stdout)
    return {"task": the_task.name, "split": split, "threshold": net.exit_threshold,
            "batch_size": batch_size, "rows": rows}
