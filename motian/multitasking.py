"""`motian multitask`: MT-DNN (Liu et al. 2019, "Multi-Task Deep Neural Networks for Natural
Language Understanding"): one encoder fine-tuned on several tasks at once, each task with its own
head, then optionally fine-tuned on each task alone from the multi-task encoder.

Training is `fit`, the one loop, with two small pieces (as `motian finetune` has one each):
* `TaskMix`, the batch source: every optimizer step draws one task and takes its whole global
  batch from that task's own `FeatureBatches` stream (MT-DNN's "pick a task, then a mini-batch
  of it"). The draw is a pure function of (seed, step): a resumed run, and every rank of a
  torchrun, draws the same task. Sampling (`task_probabilities`): proportional to the training
  sizes (MT-DNN), annealed (p_i ∝ n_i^α with α going linearly from 1 to `ANNEAL_TO` over the
  run: Stickland & Murray 2019, "BERT and PALs", anneal α so small tasks are not starved late
  in training), or uniform.
* `MultiTaskObjective`: one `TaskObjective` per task (its head's loss, the auxiliary MLM loss,
  layer-wise rates and gradual unfreezing exactly as `finetune`), all sharing one encoder
  module, so the encoder is one set of parameters; the step's loss is its task's alone.

The models: task i's model is the head class `finetune` builds for that task, with its
`backbone` attribute set to task 0's; checkpoints hold task 0's model plus the other heads as
the objective's extra tensors (`fit` restores both). A finished seed saves each task as a plain
fine-tuned model (`out/seed-N/model/<task>`: the shared encoder + that task's head, tokenizer,
task card), so `motian evaluate`, `predict`, `serve` and `export` use it like any `finetune`
model, and `--then-single` (or `motian finetune --model out/seed-N/model/<task>`) continues from
it, head included.

A run directory holds per seed `seed-N/` (result.json, metrics.jsonl with `loss_<task>` per
step, the models), per task `<task>/results.json` and `results.md` (the same fields and
metrics as `motian finetune` writes) and `<task>/single/` with `--then-single`, and for the run
`results.json` and `results.md` (every task side by side).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from motian.errors import UserError
from motian.finetuning import (
    DEFAULT_SEEDS,
    POOLED_TYPES,
    evaluate_splits,
    finetune,
    fingerprint,
    finished_seed,
    load_start,
    load_task,
    majority_class,
    open_tokenizer,
    remove_checkpoints,
    require_scored_split,
    resolve_defaults,
    save_fine_tuned,
    settings_record,
    subset,
)
from motian.io import write_json_atomic, write_text_atomic
from motian.model.artifact import tokenizer_vocab_hash
from motian.model.heads import MLMHead
from motian.reporting.tables import fmt, results_table, summarise
from motian.task_training import (
    FeatureBatches,
    TaskObjective,
    TaskTraining,
    optimizer_groups,
    seed_everything,
    total_steps,
    train_on_batches,
)
from motian.tasks.builtin import BUILTIN_TASKS
from motian.tasks.features import Featurizer
from motian.tasks.heads import build_head
from motian.tasks.types import Task
from motian.tasks.user import USER_TASKS
from motian.train import distributed as dist_utils
from motian.train.distributed import DistInfo
from motian.train.fit import Objective, resolve_precision
from motian.train.settings import OptimSettings, RunSettings, Stage

Sampling = Literal["proportional", "annealed", "uniform"]
SAMPLINGS: tuple[str, ...] = Sampling.__args__
ANNEAL_TO = 0.5  # α at the end of an annealed run (1 at its start)


# --------------------------------------------------------------------------- sampling


def task_probabilities(sizes: list[int], sampling: str, fraction: float = 0.0) -> list[float]:
    """Probability of drawing each task for a step at `fraction` of the run: p_i ∝ n_i^α with
    α = 1 (proportional), 0 (uniform) or 1 - (1 - ANNEAL_TO) * fraction (annealed)."""
    if sampling not in SAMPLINGS:
        raise UserError(f"--sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    alpha = {"proportional": 1.0, "uniform": 0.0}.get(sampling, 1 - (1 - ANNEAL_TO) * fraction)
    weights = [float(n) ** alpha for n in sizes]
    return [w / sum(weights) for w in weights]


class TaskMix:
    """The `BatchSource` of multi-task training: for each step one task, drawn with
    `task_probabilities` at the step's progress from a generator seeded by (seed, step), gives
    all the step's micro-batches (each tagged with the task's index under "task")."""

    def __init__(self, sources: list[FeatureBatches], sizes: list[int], sampling: str,
                 seed: int, steps: int):
        self.sources, self.sizes, self.sampling = sources, sizes, sampling
        self.seed, self.steps = seed, steps
        self.step = 0  # steps whose batches were drawn

    def task_at(self, step: int) -> int:
        probs = task_probabilities(self.sizes, self.sampling, step / max(self.steps, 1))
        u = np.random.default_rng([self.seed, step]).random()
        return min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)

    def start(self, stage: int, spec: Stage, micro: int, info: DistInfo,
              state: dict | None) -> Iterator[dict[str, Tensor]]:
        self.step = int(state["step"]) if state else 0
        streams = [s.start(stage, spec, micro, info, state["tasks"][i] if state else None)
                   for i, s in enumerate(self.sources)]
        return self._batches(streams, spec.global_batch // (micro * info.world_size))

    def _batches(self, streams: list[Iterator], accum: int) -> Iterator[dict[str, Tensor]]:
        while True:
            task = self.task_at(self.step)
            self.step += 1
            for _ in range(accum):
                yield {**next(streams[task]), "task": torch.tensor(task)}

    def state_dict(self) -> dict:
        return {"step": self.step, "tasks": [s.state_dict() for s in self.sources]}


# --------------------------------------------------------------------------- the objective


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A task model's own parameters: everything but the (shared) encoder."""
    return [p for name, p in model.named_parameters() if not name.startswith("backbone.")]


class MultiTaskObjective(Objective):
    """Each micro-batch's loss is its task's `TaskObjective` loss; statistics add
    `loss_<task>` (the per-task loss, logged per step). The heads of the other tasks enter the
    loss times zero, so that DDP sees every parameter used in every step, and their (zero)
    gradients are dropped after the backward: an idle head is neither updated nor decayed,
    alone or under torchrun alike."""

    def __init__(self, objectives: list[TaskObjective], names: list[str]):
        super().__init__()
        self.tasks = nn.ModuleList(objectives)
        self.model = objectives[0].model  # checkpoints hold it; the other heads are extra
        self.names = names
        self._used: set[int] = set()

    def units(self, batch: dict[str, Tensor]) -> float:
        return self.tasks[int(batch["task"])].units(batch)

    def forward(self, batch: dict[str, Tensor], units_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        t = int(batch["task"])
        self._used.add(t)
        inputs = {k: v for k, v in batch.items() if k != "task"}
        loss, stats = self.tasks[t](inputs, units_per_rank, micro_steps)
        stats[f"loss_{self.names[t]}_sum"] = stats["loss_sum"]
        stats[f"units_{self.names[t]}"] = stats["units"]
        idle = [p for i, o in enumerate(self.tasks) if i != t for p in head_parameters(o.model)]
        if idle:
            loss = loss + 0.0 * sum(p.sum() for p in idle)
        return loss, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        per_task = {f"loss_{n}_sum" for n in self.names} | {f"units_{n}" for n in self.names}
        values = super().summarise({k: v for k, v in sums.items() if k not in per_task})
        for name in self.names:
            if sums.get(f"units_{name}"):
                values[f"loss_{name}"] = sums[f"loss_{name}_sum"] / sums[f"units_{name}"]
        return values

    def param_groups(self, weight_decay: float) -> list[dict]:
        first = self.tasks[0]
        extra = nn.ModuleList([o.model for o in self.tasks[1:]]
                              + ([first.mlm] if first.mlm is not None else []))
        return optimizer_groups(first.model, weight_decay, first.settings.layer_lr_decay, extra)

    def before_step(self, fraction: float) -> None:
        self._used = set()
        for o in self.tasks:
            o.before_step(fraction)

    def after_backward(self) -> None:
        for i, o in enumerate(self.tasks):
            o.after_backward()
            if i not in self._used:
                for p in head_parameters(o.model):
                    p.grad = None


def share_encoder(models: list[nn.Module]) -> list[nn.Module]:
    """Point every model's `backbone` at the first one's: one encoder, one parameter set."""
    for m in models[1:]:
        m.backbone = models[0].backbone
    return models


# --------------------------------------------------------------------------- the tasks


def load_tasks(specs: list[str], scheme: Literal["BIO", "BIOES"]
               ) -> list[tuple[Task, Path | None]]:
    """(task, data directory) for each "NAME" (a bundled task) or "NAME=DIR" (a CLUE task or
    your own files), refusing what cannot be trained together."""
    if len(specs) < 2:
        raise UserError(f"--tasks {' '.join(specs)}: multi-task fine-tuning needs at least two "
                        "tasks; for one task use `motian finetune --task NAME`")
    out: list[tuple[Task, Path | None]] = []
    for spec in specs:
        name, _, where = spec.partition("=")
        data = Path(where) if where else None
        if name not in BUILTIN_TASKS and name not in USER_TASKS and not _is_clue(name):
            raise UserError(f"--tasks {spec}: unknown task {name!r}; bundled tasks: "
                            f"{', '.join(BUILTIN_TASKS)}; CLUE tasks (afqmc, tnews, ...) and "
                            f"your own files ({', '.join(USER_TASKS)}) as NAME=DIR")
        if data is None and name not in BUILTIN_TASKS:
            raise UserError(f"--tasks {spec}: {name} reads its files from a directory: write "
                            f"it as {name}=DIR")
        task = load_task(name, data, scheme)
        if task.type == "generation":
            raise UserError(f"--tasks {spec}: a generation task cannot share an encoder with "
                            "the others (it needs a causal decoder; the multi-task heads read a "
                            "bidirectional encoder); fine-tune it alone with `motian finetune`")
        if not task.splits.get("train"):
            raise UserError(f"--tasks {spec}: the training split is empty")
        out.append((task, data))
    names = [t.name for t, _ in out]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise UserError(f"--tasks: {', '.join(twice)} given twice; each task gets one head, "
                        "so list every task once (your own tasks are named by their directory)")
    return out


def _is_clue(name: str) -> bool:
    from motian.tasks.clue import clue_name

    return clue_name(name) is not None


# --------------------------------------------------------------------------- the verb


@dist_utils.in_process_group
def multitask(tasks: list[str], out: Path, model: Path | None = None,
              tokenizer: Path | None = None, preset: str = "tiny",
              seeds: list[int] | None = None, sampling: Sampling = "proportional",
              then_single: bool = False, max_length: int = 128,
              scheme: Literal["BIO", "BIOES"] = "BIO", max_train: int | None = None,
              max_eval: int | None = None, save_model: bool = True,
              pooling: Literal["cls", "mean"] | None = None, dropout: float | None = None,
              checkpoint_every: int = 200, allow_vocab_mismatch: bool = False,
              training: TaskTraining = TaskTraining(),
              optim: OptimSettings = OptimSettings(lr=0.0),
              run: RunSettings = RunSettings(), *, info: DistInfo) -> dict:
    """Fine-tune one encoder on several tasks at once (MT-DNN), one head per task; report
    each task's dev/test mean ± std as `finetune` does.

    Writes out/results.json and out/results.md (every task), per task out/TASK/results.json
    and results.md (the fields and metrics of `motian finetune`), per seed out/seed-N/
    (result.json, metrics.jsonl with each task's loss, and out/seed-N/model/TASK: the shared
    encoder with that task's head, usable by evaluate, predict, serve and export). A seed
    already finished with the same settings is reused; an interrupted one resumes.

    Args:
        tasks: two or more tasks: bundled ones by name (reviews-sentiment, pd98-ner, pd98-seg,
            pd98-headline), CLUE tasks and your own files as NAME=DIR (afqmc=data/afqmc,
            text-classification=data/mine). Generation tasks are refused (they need a causal
            decoder).
        out: run directory.
        model: starting weights, as for finetune (none = random initialisation of --preset).
        tokenizer: tokenizer directory / tokenizer.json / vocab.txt (default: the model's own).
        preset: model shape for random initialisation.
        seeds: random seeds, one multi-task run each (default 1 2 3).
        sampling: which task a step trains: proportional (p ∝ training size, MT-DNN),
            annealed (p ∝ size^α, α from 1 down to 0.5 over the run) or uniform.
        then_single: afterwards fine-tune each task alone from its multi-task model (same
            settings and seed), results in out/TASK/single/.
        max_length: tokens per input sequence.
        scheme: tagging scheme for token tasks (pd98-seg always uses BIOES = BMES).
        max_train: use only N training examples of each task (a stable hash sample).
        max_eval: use only N dev and test examples of each task.
        save_model: keep each seed's per-task models (--then-single needs them).
        pooling: what classification heads read: cls or mean (default: chosen for the model,
            as finetune does).
        dropout: dropout while fine-tuning (default: the model's own).
        checkpoint_every: optimizer steps between checkpoints of a seed (0 = only at its end).
        allow_vocab_mismatch: use a tokenizer with another vocabulary than the model's.
        training: epochs (passes over all tasks' training data together), batch size (every
            step's batch is one task's), warm-up and the fine-tuning techniques.
        optim: the optimiser; --lr 0 (the default) chooses the rate for the model's width.
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    out, seeds = Path(out), list(seeds or DEFAULT_SEEDS)
    if then_single and not save_model:
        raise UserError("--then-single continues from the saved multi-task models: drop "
                        "--no-save-model")
    loaded = load_tasks(tasks, scheme)
    the_tasks = [t for t, _ in loaded]
    for task, data in loaded:
        require_scored_split(task, data, max_eval)
    tok_path, tok, special = open_tokenizer(model, tokenizer, allow_vocab_mismatch)
    pooled = next((t.type for t in the_tasks if t.type in POOLED_TYPES), the_tasks[0].type)
    chosen, optim, overrides = resolve_defaults(pooled, model, preset, tok.get_vocab_size(),
                                                False, optim, pooling, dropout, info)
    pooling = overrides.get("classifier_pooling")
    _, start_info, _ = load_start(the_tasks[0], model, preset, tok.get_vocab_size(), False,
                                  overrides)
    config = {"tasks": [{"name": t.name, "spec": s, "scheme": t.scheme}
                        for t, s in zip(the_tasks, tasks)],
              "sampling": sampling, "model": str(model) if model else None,
              "model_sha256": start_info.get("sha256"), "tokenizer": str(tok_path),
              "preset": None if model else preset, "random_init": False,
              **({"model_overrides": overrides} if overrides else {}),
              "max_length": max_length, "max_train": max_train, "max_eval": max_eval,
              **settings_record(training, optim)}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    featurizers = [Featurizer(t, tok, special, max_length) for t in the_tasks]
    train_examples = [subset(t.splits["train"], max_train) for t in the_tasks]
    shared = _MultiSeeds(the_tasks, config, training, optim, run, info, model, preset, tok,
                         special, featurizers, [f(e) for f, e in zip(featurizers, train_examples)],
                         max_eval, save_model, checkpoint_every, sampling)
    runs = [shared.run(seed, out / f"seed-{seed}") for seed in seeds]
    per_task = {}
    for i, task in enumerate(the_tasks):
        task_runs = [{**r["tasks"][task.name], "seed": r["seed"], "precision": r["precision"],
                      "train_seconds": r["train_seconds"]} for r in runs]
        per_task[task.name] = {
            "task": {"name": task.name, "type": task.type,
                     **({"format": task.format} if task.format else {}),
                     "sizes": {**task.sizes(), "train_used": len(train_examples[i])},
                     "notes": task.notes},
            "model": start_info, "config": {**config, "task": task.name}, "defaults": chosen,
            "runs": task_runs, "summary": summarise(task_runs)}
        majority = majority_class(task, train_examples[i], {
            split: subset(task.splits.get(split, []), max_eval) for split in ("dev", "test")})
        if majority is not None:
            per_task[task.name]["majority_class"] = majority
    single = {}
    if then_single:
        single = {task.name: _then_single(task, data, spec, out, seeds, tok_path, config,
                                          training, optim, run, info, save_model, pooling,
                                          dropout, checkpoint_every, scheme)
                  for (task, data), spec in zip(loaded, tasks)}
    result = {"tasks": per_task, "model": start_info, "config": config, "defaults": chosen,
              "runs": runs, **({"then_single": single} if single else {})}
    if info.is_main:
        for name, task_result in per_task.items():
            write_json_atomic(out / name / "results.json", task_result)
            write_text_atomic(out / name / "results.md", results_table(task_result)
                              .replace("fine-tuning results", "multi-task fine-tuning results"))
        write_json_atomic(out / "results.json", result)
        write_text_atomic(out / "results.md", multitask_table(result))
        print((out / "results.md").read_text(encoding="utf-8").split("Resolved settings")[0])
    return result


class _MultiSeeds:
    """What every seed of a multi-task run shares, and `run(seed)`."""

    def __init__(self, tasks: list[Task], config: dict, training: TaskTraining,
                 optim: OptimSettings, run: RunSettings, info: DistInfo,
                 model_path: Path | None, preset: str, tok, special: dict[str, int],
                 featurizers: list[Featurizer], train_features: list[list], max_eval: int | None,
                 save_model: bool, checkpoint_every: int, sampling: str):
        self.tasks, self.config, self.training, self.optim = tasks, config, training, optim
        self.run_settings, self.info, self.model_path, self.preset = run, info, model_path, \
            preset
        self.tok, self.special, self.featurizers = tok, special, featurizers
        self.train_features, self.max_eval, self.save_model = train_features, max_eval, \
            save_model
        self.checkpoint_every, self.sampling = checkpoint_every, sampling
        self.sizes = [len(f) for f in train_features]
        self.steps = total_steps(sum(self.sizes), training.epochs, training.batch_size)

    def build(self, seed: int) -> MultiTaskObjective:
        """The task models (one encoder, one head per task) and their objective."""
        seed_everything(seed)
        first, _, mlm_state = load_start(self.tasks[0], self.model_path, self.preset,
                                         self.tok.get_vocab_size(), False,
                                         self.config.get("model_overrides"))
        models = share_encoder([first] + [build_head(t, first.config) for t in self.tasks[1:]])
        mlm = None
        if self.training.aux_mlm:
            mlm = MLMHead(first.config)
            if mlm_state:
                mlm.load_state_dict(mlm_state)
        for m in models:
            m.vocab_hash = tokenizer_vocab_hash(self.tok)
        return MultiTaskObjective([TaskObjective(m, t.type, self.training, self.special, mlm)
                                   for m, t in zip(models, self.tasks)],
                                  [t.name for t in self.tasks])

    def run(self, seed: int, seed_dir: Path) -> dict:
        config, info = self.config, self.info
        previous = finished_seed(seed_dir, config, seed, info)
        if previous is not None:
            return previous
        objective = self.build(seed)
        source = TaskMix([FeatureBatches(f, t.type, self.special["pad"], seed)
                          for f, t in zip(self.train_features, self.tasks)],
                         self.sizes, self.sampling, seed, self.steps)
        drawn = Counter(source.task_at(s) for s in range(self.steps))
        starved = [t.name for i, t in enumerate(self.tasks) if not drawn[i]]
        if starved and info.is_main:
            print(f"motian: seed {seed}: {', '.join(starved)} drawn for none of the "
                  f"{self.steps} steps ({self.sampling} sampling): its head stays untrained; "
                  "give more --epochs or use --sampling annealed / uniform", file=sys.stderr)
        t0 = time.perf_counter()
        stats = train_on_batches(objective, source, self.steps, self.training, self.optim,
                                 self.run_settings, info, seed, seed_dir,
                                 fingerprint(config, seed), self.checkpoint_every,
                                 f"multitask seed {seed}", config["max_length"])
        precision = self.run_settings.precision
        result: dict = {"seed": seed, "train_seconds": round(time.perf_counter() - t0, 2),
                        "precision": resolve_precision(precision, info.device),
                        "steps": stats["steps"], "final_loss": stats["final_loss"],
                        "skipped_steps": stats["skipped_steps"], "tasks": {}}
        for i, (task, o) in enumerate(zip(self.tasks, objective.tasks)):
            result["tasks"][task.name] = {"steps": drawn[i], **evaluate_splits(
                o.model, task, self.featurizers[i], self.special["pad"], self.max_eval,
                info.device, seed_dir / task.name, precision, info.is_main)}
        if info.is_main:
            if self.save_model:
                for task, o in zip(self.tasks, objective.tasks):
                    save_fine_tuned(o.model, task, self.tok, config["max_length"],
                                    seed_dir / "model" / task.name)
            write_json_atomic(seed_dir / "result.json", {"config": config, "result": result})
            remove_checkpoints(seed_dir)
        return result


def _then_single(task: Task, data: Path | None, spec: str, out: Path, seeds: list[int],
                 tok_path: Path, config: dict, training: TaskTraining, optim: OptimSettings,
                 run: RunSettings, info: DistInfo, save_model: bool, pooling: str | None,
                 dropout: float | None, checkpoint_every: int, scheme: str) -> dict:
    """Fine-tune `task` alone from each seed's multi-task model with that seed (`finetune`,
    in out/TASK/single/from-seed-N); the seeds gathered in out/TASK/single/results.json."""
    name = spec.partition("=")[0]
    own = task.name if task.format else None
    runs, first = [], None
    for seed in seeds:
        got = finetune.__wrapped__(
            name, out / task.name / "single" / f"from-seed-{seed}",
            model=out / f"seed-{seed}" / "model" / task.name, tokenizer=tok_path, data=data,
            seeds=[seed], max_length=config["max_length"], scheme=scheme,
            max_train=config["max_train"], max_eval=config["max_eval"], save_model=save_model,
            pooling=pooling, dropout=dropout, checkpoint_every=checkpoint_every, name=own,
            training=training, optim=optim, run=run, info=info)
        first = first or got
        runs.extend(got["runs"])
    result = {**first, "model": {"source": f"multi-task models {out}/seed-N/model/{task.name}"},
              "runs": runs, "summary": summarise(runs)}
    if info.is_main:
        write_json_atomic(out / task.name / "single" / "results.json", result)
        write_text_atomic(out / task.name / "single" / "results.md", results_table(result))
    return result


def multitask_table(result: dict) -> str:
    """The run's Markdown page: every task's mean ± std (×100) over the seeds, multi-task and,
    with --then-single, then fine-tuned alone."""
    single = result.get("then_single") or {}
    seeds = ", ".join(str(r["seed"]) for r in result["runs"])
    steps = ", ".join(f"{name} {sum(r['tasks'][name]['steps'] for r in result['runs'])}"
                      for name in result["tasks"])
    lines = [f"# Multi-task fine-tuning (MT-DNN): {', '.join(result['tasks'])}", "",
             f"- model: {result['model']['source']}",
             f"- seeds: {seeds}; sampling {result['config']['sampling']}; steps drawn per task "
             f"(all seeds): {steps}", "",
             "| task | split | metric | multi-task |" + (" then single |" if single else ""),
             "|---|---|---|---|" + ("---|" if single else "")]
    for name, task_result in result["tasks"].items():
        alone = (single.get(name) or {}).get("summary", {})
        for split, metrics in task_result["summary"].items():
            for metric, (mean, std, _) in metrics.items():
                row = f"| {name} | {split} | {metric} | {fmt(mean, std)} |"
                if single:
                    other = alone.get(split, {}).get(metric)
                    row += f" {fmt(other[0], other[1]) if other else '—'} |"
                lines.append(row)
    settings = json.dumps(result["config"], indent=2, ensure_ascii=False)
    return "\n".join(lines + ["", "Resolved settings:", "", "```json", settings, "```", ""])
