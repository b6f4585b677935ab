"""The pretraining loop, `fit`: one visible `while` loop over optimizer steps.

Each step, in plain sight: pick the stage from the run's progress (a later stage switches the
sequence length and batch size over the same shards, no new preprocessing), set the learning
rate (one decay over the whole run times the stage's own warm-up), draw the step's micro-batches,
forward/backward each (gradients accumulate; DDP all-reduces on the last one), unscale (fp16),
clip, skip the step if the gradient is not finite, step the optimizer, then log, evaluate on the
held-out documents and checkpoint when due.

Exactness. Everything random is a pure function of the position in the run: the loader's order
and masks of (seed, epoch, row), dropout of (seed, step, first global row of the micro-batch),
reseeded before every micro-batch. So a resumed run continues bit for bit, and a 2-process run
draws the same dropout masks as 1 process with the same micro-batch. See `objectives` for why
the loss is weighted by masked tokens per global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.data.pairs import SentenceIndex
from motian.errors import UserError
from motian.train import distributed as dist_utils
from motian.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from motian.train.distributed import DistInfo
from motian.train.metrics import MetricsLogger, run_metadata
from motian.train.objectives import (
    Pretrainer,
    TaskWeighting,
    build_model,
    predicted_tokens,
    task_names,
)
from motian.train.optim import build_optimizer
from motian.train.recipe import EvalSpec, Recipe, RunSettings, Stage, accumulation, to_dict
from motian.train.schedule import Progress, lr_multiplier, set_lr

LOG_EVERY = 10  # optimizer steps between metric records


# --------------------------------------------------------------------------- data


class SplitLoader(PackedLoader):
    """`PackedLoader` over the training documents or only the held-out ones.

    Document d (numbered across shards in dataset order, empty ones included) is held out when
    ``d % holdout_every == holdout_every - 1``: a fixed, evenly spread slice that does not
    depend on the recipe, so every recipe is evaluated on the same text and never trains on it
    (in packed rows and in sentence-order pairs alike)."""

    def __init__(self, data: Path, config: LoaderConfig, holdout_every: int, held_out: bool):
        self._split = (holdout_every, held_out)  # read by _index_documents during __init__
        super().__init__(data, None, config)
        if self._sentences is not None:
            s, keep = self._sentences, self._keep(self._sentences.doc)
            self._sentences = SentenceIndex(s.shard[keep], s.doc[keep], s.start[keep],
                                            s.end[keep], s.offset[keep], s.doc_len[keep],
                                            s.n_docs)
            self._plan_cache = None
            if self.steps_per_epoch == 0:
                raise UserError(f"{data}: too few sentence pairs outside the held-out documents "
                                "for one global batch; use more data or a smaller batch")

    def _keep(self, doc_ids: np.ndarray) -> np.ndarray:
        every, held_out = self._split
        if every <= 0:
            return np.full(len(doc_ids), not held_out)
        return (doc_ids % every == every - 1) == held_out

    def _index_documents(self) -> None:
        super()._index_documents()
        ids, base = [], 0
        for shard in self.shards:
            docs = np.asarray(shard.docs, dtype=np.int64)
            ids.append(base + np.flatnonzero(np.diff(docs) > 0))  # the docs the parent kept
            base += len(docs) - 1
        keep = self._keep(np.concatenate(ids) if ids else np.zeros(0, np.int64))
        if not keep.any():
            side = "held-out" if self._split[1] else "training"
            raise UserError(f"{self.dataset.directory}: no {side} documents (holdout_every="
                            f"{self._split[0]}, {len(keep)} documents); use more data or "
                            "change eval.holdout_every")
        self.doc_shard, self.doc_start, self.doc_len = (
            self.doc_shard[keep], self.doc_start[keep], self.doc_len[keep])


def train_loader(data: Path, recipe: Recipe, stage: Stage, micro: int,
                 info: DistInfo) -> SplitLoader:
    d = recipe.data
    config = LoaderConfig(seq_len=stage.seq_len, batch_size=micro, seed=d.seed,
                          cross_document_attention=d.cross_document_attention, rank=info.rank,
                          world_size=info.world_size, pair_task=d.pair_task,
                          click_files=tuple(d.click_files), masking=d.masking_config())
    return SplitLoader(data, config, recipe.eval.holdout_every, held_out=False)


def eval_batches(data: Path, spec: EvalSpec, causal: bool
                 ) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The common evaluation set: `spec.rows` packed rows of held-out documents with BERT token
    masking at 15% (80/10/10), a fixed seed, the same for every recipe. Also returns the
    vocabulary size of the data."""
    config = LoaderConfig(seq_len=spec.seq_len, batch_size=spec.batch, seed=spec.seed,
                          masking=MaskingConfig(strategy="token", rate=0.15))
    loader = SplitLoader(data, config, spec.holdout_every, held_out=True)
    n = min(max(spec.rows // spec.batch, 1), loader.steps_per_epoch)
    batches = iter(loader) if not causal else causal_batches(loader)
    return [next(batches) for _ in range(n)], len(loader.vocab)


def causal_batches(loader: PackedLoader):
    """Next-token batches from the same packed rows: the unmasked tokens are inputs and labels
    (the model shifts), padding ignored."""
    for arrays, _ in loader.iter_numpy():
        tokens = torch.from_numpy(arrays["tokens"])
        mask = torch.from_numpy(arrays["attention_mask"])
        yield {"input_ids": tokens, "attention_mask": mask,
               "labels": tokens.masked_fill(mask == 0, -100)}


# --------------------------------------------------------------------------- state


@dataclass
class RunState:
    """What the loop carries from step to step (and saves in state.json)."""

    step: int = 0
    stage: int = -1
    bad_steps: int = 0  # non-finite steps in a row
    tokens_seen: int = 0
    loader: dict | None = None
    last_eval: dict = field(default_factory=dict)


def stage_at(recipe: Recipe, fraction: float) -> int:
    bounds = recipe.stage_bounds()
    for i, (_, end) in enumerate(bounds):
        if fraction < end - 1e-12:
            return i
    return len(bounds) - 1


def learning_rate(recipe: Recipe, fraction: float, stage: int) -> float:
    """Peak LR x one decay over the whole run x this stage's warm-up (stage 1's warm-up is the
    run's warm-up; a later stage re-warms after its change of length and batch)."""
    start, end = recipe.stage_bounds()[stage]
    in_stage = (fraction - start) / max(end - start, 1e-12)
    o = recipe.optim
    decay = lr_multiplier(fraction, 0.0, o.decay, o.min_ratio)
    warm = lr_multiplier(in_stage, recipe.stages[stage].warmup, "constant")
    return o.lr * decay * warm


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast on CUDA (bf16 also on CPU, for tests); fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"  # on CPU bf16 is far slower than fp32 on most cores
    if precision == "fp16" and device.type != "cuda":
        raise UserError("fp16 with a loss scaler needs CUDA; use --precision fp32 (or bf16) on CPU")
    return precision


def encoded_tokenizer(data: Path) -> Path | None:
    """The tokenizer the shards in `data` were encoded with: the tokenizer.json their manifest
    names when it is still there with the same vocabulary, else the vocab.txt that `encode`
    copied beside the shards (the same vocabulary, BERT's pipeline); None if neither is."""
    data = Path(data)
    vocab = data / "vocab.txt"
    try:
        named = json.loads((data / "manifest.json").read_text("utf-8")).get("tokenizer")
    except (OSError, json.JSONDecodeError):
        named = None
    if named:
        path = Path(named)
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.suffix == ".json" and path.is_file() and vocab.is_file():
            from tokenizers import Tokenizer

            tokens = vocab.read_text("utf-8").splitlines()
            if Tokenizer.from_file(str(path)).get_vocab() == {t: i for i, t in enumerate(tokens)}:
                return path
    return vocab if vocab.is_file() else None


def dropout_seed(seed: int, step: int, first_row: int) -> int:
    return int(np.random.SeedSequence([seed, step, first_row]).generate_state(1)[0])


# --------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool
    stats: dict[str, float]


def optimizer_step(pretrainer: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   clip_norm: float, scaler=None) -> tuple[float, bool]:
    """Unscale, clip, and step unless the gradient is not finite. Returns (norm, skipped).
    A skipped step leaves weights and optimizer moments untouched."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in pretrainer.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else math.inf)
    skipped = not bool(torch.isfinite(norm))
    if scaler is not None:
        scaler.step(optimizer)  # skips by itself on inf/NaN and lowers the scale
        scaler.update()
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), skipped


def train_step(model: torch.nn.Module, micro_batches: list[dict], info: DistInfo,
               settings: dict, seeds: list[int]) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step (gradients accumulate;
    DDP synchronises only on the last). Returns summed statistics for logging."""
    n_tok = torch.tensor([float(sum(predicted_tokens(b) for b in micro_batches))])
    dist_utils.all_reduce_sum(n_tok, info)
    tokens_per_rank = max(float(n_tok) / info.world_size, 1.0)
    totals: dict[str, float] = {}
    for k, (batch, seed) in enumerate(zip(micro_batches, seeds)):
        torch.manual_seed(seed)
        batch = {name: t.to(info.device, non_blocking=True) for name, t in batch.items()}
        last = k == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            with settings["autocast"]:
                loss, stats = model(batch, tokens_per_rank, len(micro_batches))
            if settings["scaler"] is not None:
                loss = settings["scaler"].scale(loss)
            loss.backward()
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        totals["input_tokens"] = totals.get("input_tokens", 0.0) + float(
            batch["attention_mask"].sum())
    return totals


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict], info: DistInfo,
             autocast) -> dict[str, float]:
    """Held-out masked-token (or next-token) loss and accuracy, each rank taking every
    world_size-th batch; sums are all-reduced so every rank gets the same numbers."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, tokens
    for batch in batches[info.rank::info.world_size]:
        batch = {k: v.to(info.device) for k, v in batch.items()}
        with autocast:
            if "labels" in batch:  # causal
                logits = model(batch["input_ids"], batch["attention_mask"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                logits, labels = logits.flatten(0, 1), labels.reshape(-1)
                keep = labels != -100
                logits, labels = logits[keep], labels[keep]
            else:
                logits = model(**{k: v for k, v in batch.items() if k != "mlm_labels"}).logits
                labels = batch["mlm_labels"]
        logits = logits.float()
        sums[0] += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        sums[1] += float((logits.argmax(-1) == labels).sum())
        sums[2] += labels.numel()
    dist_utils.all_reduce_sum(sums, info)
    model.train(was_training)
    n = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n, "tokens": int(sums[2])}


# --------------------------------------------------------------------------- the run


def fit(recipe: Recipe, settings: RunSettings, data: Path, run_dir: Path, resume: bool = False,
        init_from: Path | None = None, progress_bar: bool = True) -> dict:
    """Pretrain `recipe` on the encoded shards in `data`, writing checkpoints, metrics and the
    final model under `run_dir`. Runs alone or as one rank of torchrun. Returns a summary."""
    info = dist_utils.setup(settings.device, settings.dist_timeout_s)
    try:
        summary = _fit(recipe, settings, Path(data), Path(run_dir), info, resume, init_from,
                       progress_bar)
    except BaseException:
        dist_utils.teardown(finished=False)
        raise
    dist_utils.teardown()
    return summary


@dataclass
class _Run:
    """The objects a run is made of (built by `_build`)."""

    model: torch.nn.Module  # the head (MaskedLM, PreTrainingModel, CausalLM)
    pretrainer: Pretrainer
    step_model: torch.nn.Module  # pretrainer, wrapped in DDP / torch.compile as asked
    optimizer: torch.optim.Optimizer
    scaler: object | None
    progress: Progress
    evalset: list
    step_settings: dict
    micro_plan: list[tuple[int, int]]


def _build(recipe: Recipe, settings: RunSettings, data: Path, info: DistInfo,
           precision: str) -> _Run:
    micro_plan = [accumulation(s, settings.micro_batch, info.world_size) for s in recipe.stages]
    causal = recipe.objective.kind == "causal"
    evalset, vocab_size = eval_batches(data, recipe.eval, causal)
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank and every run
    config = recipe.model.build(vocab_size).replace(
        checkpoint_activations=settings.checkpoint_activations)
    if not causal and config.causal:
        raise UserError(f"recipe {recipe.name}: a causal model needs objective.kind: causal")
    model = build_model(config, recipe.objective, recipe.data.pair_task)
    weighting = TaskWeighting(task_names(recipe.objective, recipe.data.pair_task),
                              recipe.objective)
    pretrainer = Pretrainer(model, weighting).to(info.device)
    o = recipe.optim
    optimizer = build_optimizer(pretrainer, o.name, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    budget = recipe.budget_minutes * 60 if recipe.budget_minutes > 0 else None
    progress = Progress(None if budget else recipe.steps, budget)
    step_model = dist_utils.wrap_model(pretrainer, info)
    if settings.compile:
        step_model = torch.compile(step_model)
    step_settings = {"autocast": autocast_context(precision, info.device), "scaler": scaler}
    return _Run(model, pretrainer, step_model, optimizer, scaler, progress, evalset,
                step_settings, micro_plan)


def _fit(recipe: Recipe, settings: RunSettings, data: Path, run_dir: Path, info: DistInfo,
         resume: bool, init_from: Path | None, progress_bar: bool) -> dict:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    precision = resolve_precision(settings.precision, info.device)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints ({existing.name}); pass --resume "
                        "to continue that run, or choose another --out")
    run = _build(recipe, settings, data, info, precision)
    state = RunState()
    if existing is not None:
        _restore(run, existing, recipe, state, info)
    elif init_from is not None:
        from motian.train.objectives import init_weights_from

        init_weights_from(run.model, Path(init_from), verbose=info.is_main)
    elif resume and info.is_main:
        print(f"motian: no checkpoint under {run_dir}; starting a new run", file=sys.stderr)
    logger = _start_logging(recipe, settings, run_dir, info, precision, data) \
        if info.is_main else None
    try:
        return _loop(recipe, data, run_dir, info, run, state, logger, progress_bar)
    finally:
        if logger is not None:
            logger.close()


def _restore(run: _Run, path: Path, recipe: Recipe, state: RunState, info: DistInfo) -> None:
    saved = load_checkpoint(path, run.model, run.optimizer, run.scaler)
    if saved.get("recipe") != recipe.fingerprint():
        raise UserError(f"{path}: this checkpoint was trained with another recipe (fingerprint "
                        f"{saved.get('recipe')} vs {recipe.fingerprint()}); resume with the "
                        "recipe it was made with, or start a new run with --init-from")
    run.progress.load_state_dict(saved["progress"])
    if saved.get("log_vars") is not None:
        run.pretrainer.weighting.log_vars.data.copy_(torch.tensor(saved["log_vars"]))
    state.step, state.stage = int(saved["step"]), int(saved["stage"])
    state.bad_steps, state.tokens_seen = int(saved["bad_steps"]), int(saved["tokens_seen"])
    state.loader, state.last_eval = saved["loader"], saved.get("last_eval", {})
    if info.is_main:
        print(f"motian: resumed from {path} (step {state.step})", file=sys.stderr)


def _start_logging(recipe: Recipe, settings: RunSettings, run_dir: Path, info: DistInfo,
                   precision: str, data: Path) -> MetricsLogger:
    from motian.data.shards import write_json_atomic
    from motian.train.recipe import save_recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    meta = run_metadata(to_dict(recipe), to_dict(settings), info.world_size,
                        {"precision": precision, "device": str(info.device),
                         "recipe_fingerprint": recipe.fingerprint(),
                         "data": str(Path(data).resolve())})
    write_json_atomic(run_dir / "run.json", meta)
    # The run carries the tokenizer its model reads, so `motian finetune --model run/final`
    # (or any checkpoint under the run) needs no --tokenizer.
    tokenizer = encoded_tokenizer(data)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, run_dir / tokenizer.name)
    return MetricsLogger(run_dir)


def _loop(recipe: Recipe, data: Path, run_dir: Path, info: DistInfo, run: _Run,
          state: RunState, logger: MetricsLogger | None, progress_bar: bool) -> dict:
    progress, main = run.progress, info.is_main
    bar = _progress_bar(recipe, progress) if main and progress_bar else None
    window: dict[str, float] = {}
    last_norm, loader, batches, t_window = 0.0, None, None, time.monotonic()
    if state.step == 0 and recipe.eval.every:
        state.last_eval = _evaluate(run, info, logger, state.step)  # the untrained baseline
    progress.restart_clock()
    while not progress.done():
        stage = stage_at(recipe, progress.fraction())
        micro, accum = run.micro_plan[stage]
        if loader is None or stage != state.stage:
            loader, batches = _stage_loader(recipe, data, stage, micro, info, state, main)
        lr = learning_rate(recipe, progress.fraction(ahead=1), stage)
        set_lr(run.optimizer, lr)
        micro_batches = [next(batches) for _ in range(accum)]
        seeds = [dropout_seed(recipe.seed, state.step, (k * info.world_size + info.rank) * micro)
                 for k in range(accum)]
        with dist_utils.collective(info, "the gradient all-reduce", state.step):
            stats = train_step(run.step_model, micro_batches, info, run.step_settings, seeds)
            last_norm, skipped = optimizer_step(run.pretrainer, run.optimizer,
                                                recipe.optim.clip_norm, run.scaler)
        state.step += 1
        n_in = stats.pop("input_tokens")
        state.tokens_seen += int(n_in) * info.world_size
        window["input_tokens"] = window.get("input_tokens", 0.0) + n_in
        state.bad_steps = state.bad_steps + 1 if skipped else 0
        if skipped:
            _report_skip(recipe, state, last_norm, bar, main)
        for k, v in stats.items():
            window[k] = window.get(k, 0.0) + v
        window["skipped"] = window.get("skipped", 0.0) + skipped
        progress.update()
        _sync_clock(progress, info)
        if bar is not None:
            _advance_bar(bar, progress)
        done = progress.done()
        if state.step % LOG_EVERY == 0 or done:
            values = _log_values(run, window, info, lr, last_norm, stage, recipe, t_window,
                                 state)
            window, t_window = {}, time.monotonic()
            if logger is not None:
                logger.log("train", state.step, values)
            if bar is not None:
                bar.set_postfix_str(_postfix(values), refresh=False)
        if (recipe.eval.every and state.step % recipe.eval.every == 0) or done:
            state.last_eval = _evaluate(run, info, logger, state.step)
        if (recipe.checkpoint_every and state.step % recipe.checkpoint_every == 0) or done:
            state.loader = loader.state_dict()
            _checkpoint(run_dir, recipe, run, state, main)
        progress.restart_clock()  # evaluation and checkpoints do not count against a budget
    if bar is not None:
        bar.close()
    return _finish(run_dir, run, state, info)


def _stage_loader(recipe: Recipe, data: Path, stage: int, micro: int, info: DistInfo,
                  state: RunState, main: bool):
    """The loader of `stage`: continuing a resumed position, or from the start of the shards
    (a new stage warm-starts the model, not the data order: packing at the new length is done
    on the fly from the same shards)."""
    s = recipe.stages[stage]
    loader = train_loader(data, recipe, s, micro, info)
    if stage == state.stage and state.loader is not None:
        loader.load_state_dict(state.loader)
    elif state.stage >= 0 and main:
        tqdm.write(f"motian: stage {stage + 1}/{len(recipe.stages)} at step {state.step}: "
                   f"seq_len {s.seq_len}, global batch {s.global_batch}, warm-up "
                   f"{s.warmup:.0%} of the stage; same shards, weights carried over")
    state.stage = stage
    batches = causal_batches(loader) if recipe.objective.kind == "causal" else iter(loader)
    return loader, batches


def _report_skip(recipe: Recipe, state: RunState, norm: float, bar, main: bool) -> None:
    if state.bad_steps >= recipe.max_bad_steps:
        raise UserError(
            f"step {state.step}: the gradient was not finite (norm {norm}) for "
            f"{state.bad_steps} steps in a row, so training stopped (max_bad_steps="
            f"{recipe.max_bad_steps}). Usual causes: a learning rate too high for this model "
            "(try half), fp16 overflow (use bf16 or fp32), or weights already NaN (--init-from a "
            "bad checkpoint). Resume from the last good checkpoint with --resume after fixing it.")
    if main:
        (bar.write if bar is not None else print)(
            f"motian: step {state.step}: non-finite gradient (norm {norm}); step skipped "
            f"({state.bad_steps} in a row)")


def _sync_clock(progress: Progress, info: DistInfo) -> None:
    """Under a time budget every rank must stop at the same step: adopt the slowest clock."""
    if info.distributed and progress.budget_seconds is not None:
        t = torch.tensor([progress.elapsed], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        progress.elapsed = float(t)


def _log_values(run: _Run, window: dict[str, float], info: DistInfo, lr: float, norm: float,
                stage: int, recipe: Recipe, t_window: float, state: RunState) -> dict:
    keys = sorted(window)
    sums = dist_utils.all_reduce_sum(torch.tensor([window[k] for k in keys],
                                                  dtype=torch.float64), info)
    w = dict(zip(keys, sums.tolist()))
    values: dict[str, float] = {"stage": stage + 1, "seq_len": recipe.stages[stage].seq_len,
                                "lr": lr, "grad_norm": norm}
    for task in ("mlm", "pair", "lm"):
        count = w.get(f"{task}_tokens", w.get(f"{task}_rows", 0.0))
        if count:
            values[f"loss_{task}"] = w[f"{task}_loss_sum"] / count
            values[f"acc_{task}"] = w[f"{task}_correct"] / count
    for task, weight in run.pretrainer.weighting.weights().items():
        values[f"weight_{task}"] = weight
    if run.scaler is not None:
        values["loss_scale"] = float(run.scaler.get_scale())
    values["skipped"] = w.get("skipped", 0.0) / info.world_size
    values["tokens_seen"] = state.tokens_seen
    values["tokens_per_s"] = w.get("input_tokens", 0.0) / max(time.monotonic() - t_window, 1e-9)
    values["elapsed_s"] = run.progress.elapsed
    return values


def _postfix(values: dict) -> str:
    parts = [f"{k.removeprefix('loss_')}={values[k]:.3f}" for k in values if k.startswith("loss_")]
    if "acc_mlm" in values:
        parts.append(f"acc={values['acc_mlm']:.1%}")
    parts += [f"lr={values['lr']:.2e}", f"gnorm={values['grad_norm']:.2f}",
              f"tok/s={values['tokens_per_s']:,.0f}"]
    if "loss_scale" in values:
        parts.append(f"scale={values['loss_scale']:g}")
    return " ".join(parts)


def _progress_bar(recipe: Recipe, progress: Progress):
    if progress.budget_seconds is not None:
        bar = tqdm(total=int(progress.budget_seconds), unit="s", desc=f"pretrain {recipe.name}",
                   dynamic_ncols=True)
        bar.update(int(progress.elapsed))
        return bar
    return tqdm(total=progress.total_steps, initial=progress.steps, unit="step",
                desc=f"pretrain {recipe.name}", dynamic_ncols=True)


def _advance_bar(bar, progress: Progress) -> None:
    target = int(progress.elapsed) if progress.budget_seconds is not None else progress.steps
    bar.update(max(target - bar.n, 0))


def _evaluate(run: _Run, info: DistInfo, logger: MetricsLogger | None, step: int) -> dict:
    with dist_utils.collective(info, "held-out evaluation", step):
        result = evaluate(run.model, run.evalset, info, run.step_settings["autocast"])
    if logger is not None:
        logger.log("eval", step, result)
    return result


def _checkpoint(run_dir: Path, recipe: Recipe, run: _Run, state: RunState, main: bool) -> None:
    if not main:
        return
    log_vars = run.pretrainer.weighting.log_vars
    saved = {"recipe": recipe.fingerprint(), "stage": state.stage, "loader": state.loader,
             "progress": run.progress.state_dict(), "bad_steps": state.bad_steps,
             "tokens_seen": state.tokens_seen, "last_eval": state.last_eval,
             "log_vars": None if log_vars is None else log_vars.detach().cpu().tolist()}
    save_checkpoint(run_dir, state.step, run.model, run.optimizer, saved, run.scaler,
                    keep_last=recipe.keep_last)


def _finish(run_dir: Path, run: _Run, state: RunState, info: DistInfo) -> dict:
    from motian.data.shards import write_json_atomic
    from motian.model.io import save_pretrained

    summary = {"steps": state.step, "tokens_seen": state.tokens_seen,
               "seconds": run.progress.elapsed, "eval": state.last_eval,
               "final": str(run_dir / "final"), "metrics": str(run_dir / "metrics.jsonl"),
               "checkpoint": str(latest_checkpoint(run_dir) or ""), "rank": info.rank}
    if info.is_main:
        save_pretrained(run.model, run_dir / "final")
        for name in ("tokenizer.json", "vocab.txt"):  # the copy _start_logging made
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, run_dir / "final" / name)
        write_json_atomic(run_dir / "summary.json", summary)
    return summary
