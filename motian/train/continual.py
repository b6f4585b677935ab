"""ERNIE 2.0's continual multi-task pretraining (Sun et al. 2020, "ERNIE 2.0: A Continual
Pre-Training Framework for Language Understanding", AAAI): tasks are added stage by stage and
the earlier ones kept, so what was learned first is not forgotten.

A recipe turns it on by naming each stage's tasks with sampling weights::

    stages:
      - {name: knowledge, fraction: 0.4, tasks: {mlm: 1.0}}
      - {name: structure, fraction: 0.3, tasks: {mlm: 1.0, reorder: 0.3, distance: 0.3}}
      - {name: relevance, fraction: 0.3, tasks: {mlm: 1.0, reorder: 0.3, distance: 0.3,
                                                 relevance: 0.3}}

The tasks (`TASKS`), each with its own small head on [CLS] except MLM:

* ``mlm``: packed corpus rows masked with the recipe's ``data.masking`` (``ernie``: knowledge
  masking, words, phrases and named entities, `motian.data.entities`);
* ``reorder``: a document window cut into ``data.reorder_parts`` parts at sentence ends,
  shuffled; the head names the order (k! classes, `motian.data.discourse`);
* ``distance``: two sentences, adjacent / same document / other document (3 classes);
* ``relevance``: the Motian query-title click task (``data.click_files``; ``pd98`` is the
  People's Daily headline <-> paragraph stand-in, `motian.data.clicks`), on the model's pair
  head, so the final model is a `PreTrainingModel` like motian-demo's.

**One task per step.** Each optimizer step draws its task with the stage's weights from a
generator seeded by (data.seed, stage, step in the stage): all micro-batches and every rank of
a step hold rows of that task, and the draw is a pure function of the position, so nothing of
it needs saving. Every task's rows are masked for MLM with the recipe's masking, as the pair
tasks' rows are (`motian.data.loader`), so every step trains MLM plus its task; a ``mlm`` step
is packed corpus rows only. The losses combine through the recipe's weighting (uncertainty
weighting learns one log-variance per task; a task absent from a step adds nothing).

**Resume.** A checkpoint's data position (`ContinualBatches.state_dict`) is the step within
the stage, the stage's task list, and every task loader's own position (epoch and rows
consumed); the heads and task weights are saved with the model (`Objective.extra_state`). A
resumed run therefore draws the same tasks and rows, across stage boundaries too. A new stage
starts every task's rows from the beginning of a data order of its own (seeded with
data.seed + stage * `STAGE_SEED`), so it does not read the first rows of the stage before
again.

**Logged**: ``loss_<task>`` and ``acc_<task>`` for the tasks of the window, ``share_<task>``
(the window's share of micro-batches of each task) and ``weight_<task>``; the held-out
evaluation adds ``<task>_accuracy`` (and ``_loss``, ``_majority``: always answering the most
common label) on rows of the held-out documents (relevance: ``data.click_eval_files``), for
every task of the schedule, including those whose stage has not come yet (chance).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from motian.data.discourse import DiscourseLoader, classes
from motian.data.loader import LoaderConfig
from motian.data.masking import MaskingConfig
from motian.data.splits import SplitLoader
from motian.errors import UserError
from motian.model import ModelConfig, PreTrainingModel
from motian.model.heads import ClassifierHead, masked_lm_logits
from motian.model.transformer import init_weights
from motian.train.distributed import DistInfo, all_reduce_sum
from motian.train.objectives import (
    Pretrainer,
    TaskWeighting,
    build_model,
    evaluate_lm,
    mlm_pair_losses,
)
from motian.train.settings import Stage

if TYPE_CHECKING:
    from motian.train.recipe import Recipe

TASKS = ("mlm", "reorder", "distance", "relevance")
TASK_STREAM = 4099  # tags the task draws apart from the data orders' streams
STAGE_SEED = 7717  # stage s reads its rows with data.seed + s * STAGE_SEED
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                "document_ids", "mlm_positions")


def continual(recipe: Recipe) -> bool:
    """Whether the recipe has a task schedule (any stage names tasks)."""
    return any(s.tasks for s in recipe.stages)


def schedule_tasks(recipe: Recipe) -> list[str]:
    """Every task of the schedule, in `TASKS` order."""
    named = {t for s in recipe.stages for t in s.tasks}
    return [t for t in TASKS if t in named]


def check_schedule(recipe: Recipe) -> None:
    """UserError, naming the recipe field, unless the stages' tasks make a continual schedule:
    every stage names tasks, known ones, with weights > 0, and keeps every task of the stage
    before; the objective is MLM with no separate pair task; relevance has click logs."""
    if not continual(recipe):
        return
    where = f"recipe {recipe.name}"
    before: dict = {}
    for i, stage in enumerate(recipe.stages):
        name = f"stages[{i}].tasks" + (f" (stage {stage.name})" if stage.name else "")
        if not isinstance(stage.tasks, dict) or not stage.tasks:
            raise UserError(f"{where}: {name} is empty but other stages name tasks; a task "
                            f"schedule needs every stage's tasks with weights, e.g. tasks: "
                            f"{{mlm: 1.0}}")
        unknown = sorted(set(map(str, stage.tasks)) - set(TASKS))
        if unknown:
            raise UserError(f"{where}: {name} names unknown task(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(TASKS)}")
        for task, weight in stage.tasks.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
                raise UserError(f"{where}: {name}: {task} has weight {weight!r}; a weight is "
                                f"the task's share of the stage's steps, a number > 0 (leave "
                                f"a task out of the stages before its first)")
        dropped = [t for t in before if t not in stage.tasks]
        if dropped:
            raise UserError(f"{where}: {name} drops {', '.join(dropped)}, trained in the stage "
                            f"before; a continual schedule keeps every earlier task (ERNIE "
                            f"2.0), so add {dropped[0]}: <weight> to {name}")
        before = stage.tasks
    o, d = recipe.objective, recipe.data
    if o.kind != "mlm" or o.sbo or o.notes:
        raise UserError(f"{where}: stages' tasks train MLM and classification heads; set "
                        f"objective.kind: mlm (without sbo or notes), got {o.kind}")
    if d.pair_task != "none":
        raise UserError(f"{where}: data.pair_task is {d.pair_task}, but a task schedule trains "
                        "the click task as its relevance task; set data.pair_task: none and "
                        "add relevance: <weight> to the stages' tasks")
    if "relevance" in schedule_tasks(recipe) and not d.click_files:
        raise UserError(f"{where}: the relevance task needs data.click_files (click logs, or "
                        "pd98 for the bundled People's Daily headline-paragraph stand-in)")
    if isinstance(d.reorder_parts, bool) or not isinstance(d.reorder_parts, int) \
            or not 2 <= d.reorder_parts <= 4:
        raise UserError(f"{where}: data.reorder_parts must be 2, 3 or 4 (2 to 24 orders to "
                        f"tell apart), got {d.reorder_parts!r}")


def step_task(tasks: dict, seed: int, stage: int, step: int) -> str:
    """The task of `step` (counted within `stage`): drawn with the stage's weights from a
    generator seeded by the position, so every rank and a resumed run agree."""
    names = [t for t in TASKS if t in tasks]
    weights = np.array([float(tasks[t]) for t in names])
    u = np.random.default_rng([seed, TASK_STREAM, stage, step]).random()
    k = int(np.searchsorted(np.cumsum(weights) / weights.sum(), u, side="right"))
    return names[min(k, len(names) - 1)]


def task_loader(data: Path, recipe: Recipe, task: str, config: LoaderConfig,
                held_out: bool) -> SplitLoader:
    """The loader of `task`'s rows (training or held-out documents)."""
    d, every = recipe.data, recipe.eval.holdout_every
    if task in ("reorder", "distance"):
        return DiscourseLoader(data, config, every, held_out, task, d.reorder_parts)
    if task == "relevance":
        config = replace(config, pair_task="click", pair_fraction=1.0,
                         click_files=tuple(d.click_eval_files if held_out else d.click_files),
                         click=d.click_settings())
    return SplitLoader(data, config, every, held_out)


class ContinualBatches:
    """The `BatchSource` of a task schedule: per stage one loader per task, and per step the
    micro-batches of the step's task (`step_task`), each tagged with ``task`` (its index in
    `TASKS`)."""

    def __init__(self, data: Path, recipe: Recipe):
        self.data, self.recipe = Path(data), recipe
        self.loaders: dict[str, SplitLoader] = {}
        self.step = 0
        self.tasks: dict = {}
        if "relevance" in schedule_tasks(recipe):
            # Tokenizing and segmenting the click logs (jieba) takes seconds; done now (kept
            # per process), before the clock starts, not in the stage that adds the task.
            task_loader(self.data, recipe, "relevance", LoaderConfig(), held_out=False)

    def start(self, stage: int, spec: Stage, micro: int, info: DistInfo,
              state: dict | None) -> Iterator[dict]:
        d = self.recipe.data
        # each stage reads its tasks' rows in an order of its own (not the first rows again)
        config = LoaderConfig(seq_len=spec.seq_len, batch_size=micro,
                              seed=d.seed + STAGE_SEED * stage,
                              cross_document_attention=d.cross_document_attention,
                              rank=info.rank, world_size=info.world_size,
                              masking=d.masking_config())
        self.stage, self.tasks = stage, spec.tasks
        self.loaders = {t: task_loader(self.data, self.recipe, t, config, held_out=False)
                        for t in TASKS if t in spec.tasks}
        self.step = 0
        if state is not None:
            if state.get("tasks") != list(self.loaders):
                raise UserError(f"the saved data position is of tasks {state.get('tasks')}, but "
                                f"stage {stage + 1} trains {list(self.loaders)}; resume with the "
                                "recipe the run was made with")
            self.step = int(state["step"])
            for task, loader in self.loaders.items():
                loader.load_state_dict(state["loaders"][task])
        accum = spec.global_batch // (micro * info.world_size)
        return self._batches(accum)

    def _batches(self, accum: int) -> Iterator[dict]:
        streams = {t: iter(loader) for t, loader in self.loaders.items()}
        while True:
            task = step_task(self.tasks, self.recipe.data.seed, self.stage, self.step)
            for k in range(accum):
                batch = next(streams[task])
                if k == accum - 1:  # before yielding: the saved position says "next step"
                    self.step += 1
                batch["task"] = torch.tensor(TASKS.index(task))
                yield batch

    def state_dict(self) -> dict:
        return {"step": self.step, "tasks": list(self.loaders),
                "loaders": {t: loader.state_dict() for t, loader in self.loaders.items()}}


class ContinualPretrainer(Pretrainer):
    """MLM plus the step's task on its own head (module docstring). `heads` holds reorder and
    distance ([CLS] -> pooler -> classes); relevance uses the model's pair head."""

    def __init__(self, model: nn.Module, weighting: TaskWeighting, heads: nn.ModuleDict,
                 evalset: list[dict[str, Tensor]], task_evalsets: dict[str, list[dict]]):
        super().__init__(model, weighting, evalset)
        self.heads = heads
        self.task_evalsets = task_evalsets

    def task_logits(self, task: str, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(MLM logits at the masked positions, the task head's logits or None for mlm)."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if task in ("mlm", "relevance"):
            out = self.model(**inputs)
            return out.logits, out.pair_logits if task == "relevance" else None
        B, L = batch["input_ids"].shape  # [CLS] of every row, then the masked positions
        rows = torch.cat([torch.arange(B, device=batch["input_ids"].device) * L,
                          inputs.pop("mlm_positions")])
        h = self.model.encode(**inputs, output_positions=rows)
        return masked_lm_logits(self.model, h[B:]), self.heads[task](h[:B, None])

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        task = TASKS[int(batch["task"])]
        labels = batch.get("pair_labels", batch.get("task_labels"))
        logits, head_logits = self.task_logits(task, batch)
        losses, stats = mlm_pair_losses(logits, head_logits, labels=batch["mlm_labels"],
                                        pair_labels=labels, pair_weights=batch.get(
                                            "pair_weights"), tokens_per_rank=tokens_per_rank,
                                        micro_steps=micro_steps)
        if "pair" in losses:
            losses[task] = losses.pop("pair")
        stats = {k.replace("pair_", f"{task}_"): v for k, v in stats.items()}
        stats[f"{task}_batches"] = torch.ones(())
        total = self.weighting(losses, 1.0 / micro_steps)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP needs a gradient on every parameter: the heads of the other tasks get 0
            total = total + 0.0 * sum(p.sum() for p in self.heads.parameters())
            if isinstance(self.model, PreTrainingModel):
                total = total + 0.0 * sum(p.sum() for p in self.model.pair.parameters())
        return total, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        values = super().summarise(sums)  # loss_mlm, acc_mlm
        batches = sum(sums.get(f"{t}_batches", 0.0) for t in TASKS)
        for task in TASKS[1:]:
            if sums.get(f"{task}_rows"):
                values[f"loss_{task}"] = sums[f"{task}_loss_sum"] / sums[f"{task}_rows"]
                values[f"acc_{task}"] = sums[f"{task}_correct"] / sums[f"{task}_rows"]
        for task in self.weighting.tasks:
            values[f"share_{task}"] = sums.get(f"{task}_batches", 0.0) / max(batches, 1.0)
        return values

    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if not self.evalset:
            return None
        result = evaluate_lm(self.model, self.evalset, info, autocast)
        for task, batches in self.task_evalsets.items():
            result.update(self._evaluate_task(task, batches, info, autocast))
        return result

    @torch.no_grad()
    def _evaluate_task(self, task: str, batches: list[dict], info: DistInfo,
                       autocast) -> dict[str, float]:
        """Held-out loss and accuracy of a task's head on whole rows (the evaluation masks
        are put back, as `evaluate_pairs` does), and the majority label's accuracy."""
        was_training = self.training
        self.eval()
        n_classes = self.heads[task].classifier.out_features if task in self.heads else 2
        sums = torch.zeros(3 + n_classes, dtype=torch.float64)  # loss, correct, rows, counts
        for batch in batches[info.rank::info.world_size]:
            batch = {k: v.to(info.device) for k, v in batch.items()}
            labels = batch.get("pair_labels", batch.get("task_labels"))
            whole = batch["input_ids"].clone()
            whole.view(-1)[batch["mlm_positions"]] = batch["mlm_labels"]
            with autocast:
                logits = self.task_logits(task, {**batch, "input_ids": whole})[1].float()
            sums[0] += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            sums[1] += float((logits.argmax(-1) == labels).sum())
            sums[2] += labels.numel()
            sums[3:] += torch.bincount(labels.cpu(), minlength=n_classes).double()
        all_reduce_sum(sums, info)
        self.train(was_training)
        n = max(float(sums[2]), 1.0)
        return {f"{task}_loss": float(sums[0]) / n, f"{task}_accuracy": float(sums[1]) / n,
                f"{task}_majority": float(sums[3:].max()) / n, f"{task}_rows": int(sums[2])}


def task_eval_batches(data: Path, recipe: Recipe, task: str) -> list[dict[str, Tensor]]:
    """Held-out rows of `task` masked like the MLM evaluation (BERT token masking at 15%, the
    evaluation's seed): up to max(eval.rows, 512) rows of the held-out documents (relevance:
    of data.click_eval_files; none given: no evaluation)."""
    spec = recipe.eval
    if task == "relevance" and not recipe.data.click_eval_files:
        return []
    config = LoaderConfig(seq_len=spec.seq_len, batch_size=1, seed=spec.seed,
                          masking=MaskingConfig(strategy="token", rate=0.15))
    try:  # batches of eval.batch rows, or fewer when the held-out text has fewer
        batch = min(spec.batch, task_loader(data, recipe, task, config, True).steps_per_epoch)
    except UserError as e:  # e.g. no held-out window of 3 sentences: say so, go on
        print(f"motian: no held-out {task} evaluation: {e}", file=sys.stderr)
        return []
    loader = task_loader(data, recipe, task, replace(config, batch_size=batch), held_out=True)
    n = min(max(max(spec.rows, 512) // batch, 1), loader.steps_per_epoch)
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def build_continual_objective(recipe: Recipe, data: Path, config: ModelConfig,
                              evalset: list[dict[str, Tensor]]) -> ContinualPretrainer:
    """The model (a `PreTrainingModel` when the schedule has relevance, else a `MaskedLM`),
    a head per discourse task, the weighting over every task of the schedule and the held-out
    rows of each. The caller seeds torch (the same initial weights on every rank)."""
    tasks = schedule_tasks(recipe)
    model = build_model(config, recipe.objective, "click" if "relevance" in tasks else "none")
    heads = nn.ModuleDict({t: ClassifierHead(config, classes(t, recipe.data.reorder_parts),
                                             pooling="cls")
                           for t in tasks if t in ("reorder", "distance")})
    init_weights(heads, config)
    evalsets = {t: b for t in tasks if t != "mlm" and (b := task_eval_batches(data, recipe, t))}
    return ContinualPretrainer(model, TaskWeighting(tasks, recipe.objective), heads, evalset,
                               evalsets)


__all__ = ["TASKS", "ContinualBatches", "ContinualPretrainer",
           "build_continual_objective", "check_schedule", "continual", "schedule_tasks",
           "step_task"]
