"""`motian prune`: structured pruning of a fine-tuned classifier - attention heads and FFN
neurons removed physically, then a short recovery fine-tune.

1. Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?",
   arXiv:1905.10650): every head's output and every FFN neuron is multiplied by a mask
   variable xi = 1 (`unit_masks`: forward pre-hooks on the attention output projection and on
   the FFN down projection, so the model code is untouched). The importance of a unit is
   |dL/dxi| summed over batches of task training data, L the task loss; per layer the scores
   are divided by their L2 norm (Michel et al.: without it, layers with large gradients would
   lose nothing), then ranked across all layers.
2. Pruning (`prune_model`): the lowest-ranked fraction of heads (`--heads`) and of FFN
   neurons (`--ffn`) is cut out of the weights: narrower q/k/v, output, up and down
   projections. Every layer keeps at least one head and one neuron. The config records each
   layer's kept heads (`layer_heads`, original indices, so per-head position biases such as
   ALiBi's follow their head) and FFN width (`layer_ffn`), and the directory loads back at its
   smaller size with `from_pretrained`; export, predict and serve read it like any other.
3. Recovery: the pruned model fine-tunes for `--recovery-epochs` on the task through the one
   training loop, by default distilled from the unpruned model (soft targets at temperature T
   plus the gold labels: distillation.py's `Distiller`), or on the labels alone.

Removing a head is exactly zeroing its mask (tests/test_pruning.py checks the logits), so the
accuracy "after pruning" is the masked model's. One-shot: importance is measured once, on the
unpruned model (Michel et al. also prune iteratively; at these fractions one shot is what is
measured in docs/serving.md, "Structured pruning").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.distillation import Distiller, LossWeights, task_outputs
from motian.errors import UserError
from motian.finetuning import (
    _evaluate_split,
    fingerprint,
    load_card_task,
    remove_checkpoints,
    save_fine_tuned,
    subset,
)
from motian.io import sha256_file, write_json_atomic
from motian.model.artifact import TaskCard, resolve_model_dir
from motian.model.heads import HEADS
from motian.model.io import count_parameters, from_pretrained, load_weights
from motian.task_training import TaskTraining, seed_everything, train_on_features
from motian.tasks.features import Featurizer, collate
from motian.tasks.heads import batch_loss
from motian.tasks.types import Task
from motian.train import distributed as dist_utils
from motian.train.distributed import DistInfo
from motian.train.settings import OptimSettings, RunSettings

CLASSIFIERS = ("SequenceClassification", "TokenClassification")
TASK_TYPES = ("single", "pair", "token")
RESULT = "prune.json"


# --------------------------------------------------------------------------- masks, importance


@contextmanager
def unit_masks(model: nn.Module, heads: list[Tensor] | None = None,
               ffn: list[Tensor] | None = None) -> Iterator[None]:
    """Inside the `with`, multiply head h of block i by heads[i][h] and FFN neuron j of block i
    by ffn[i][j] (masks of shape (heads in layer i,) and (ffn width of layer i,)). A mask of 0
    silences the unit; a mask of 1 that requires grad measures it (Michel et al.)."""
    blocks = model.backbone.blocks
    handles = []
    d = model.config.head_dim

    def scale(mask: Tensor, repeat: int):
        def hook(module, args):  # args[0]: (..., units * repeat), the projection's input
            return (args[0] * mask.to(args[0].dtype).repeat_interleave(repeat),) + args[1:]
        return hook

    try:
        for i, block in enumerate(blocks):
            if heads is not None:
                handles.append(block.attention.out.register_forward_pre_hook(scale(heads[i], d)))
            if ffn is not None:
                handles.append(block.ffn.down.register_forward_pre_hook(scale(ffn[i], 1)))
        yield
    finally:
        for h in handles:
            h.remove()


def unit_importance(model: nn.Module, task_type: str, batches: list[dict[str, Tensor]]
                    ) -> tuple[list[Tensor], list[Tensor]]:
    """Per block, the importance of each head and each FFN neuron: |dL/dmask| summed over
    `batches` (labelled task batches on the model's device), divided by its L2 norm within
    the layer. Returns (heads, ffn), lists of (units,) CPU tensors."""
    blocks = model.backbone.blocks
    device = next(model.parameters()).device
    heads = [torch.ones(b.attention.heads, device=device, requires_grad=True) for b in blocks]
    ffn = [torch.ones(b.ffn.down.in_features, device=device, requires_grad=True)
           for b in blocks]
    totals = [torch.zeros_like(m) for m in heads + ffn]
    was_training = model.training
    wanted = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # only the masks' gradients are needed
    try:
        with unit_masks(model, heads, ffn):
            for batch in batches:
                loss, _ = batch_loss(task_type, model, batch)
                for total, g in zip(totals, torch.autograd.grad(loss, heads + ffn)):
                    total += g.abs()
    finally:
        model.train(was_training)
        for p, w in zip(model.parameters(), wanted):
            p.requires_grad_(w)
    normed = [(t / t.norm().clamp_min(1e-20)).cpu() for t in totals]
    return normed[:len(blocks)], normed[len(blocks):]


def choose_kept(scores: list[Tensor], fraction: float) -> list[list[int]]:
    """Remove round(fraction * all units) lowest-scoring units across layers, never a layer's
    last one; return each layer's kept units (sorted indices)."""
    ranked = sorted((float(s), layer, unit) for layer, layer_scores in enumerate(scores)
                    for unit, s in enumerate(layer_scores))
    left = [len(s) for s in scores]
    removed: set[tuple[int, int]] = set()
    to_remove = round(fraction * len(ranked))
    for _, layer, unit in ranked:
        if len(removed) == to_remove:
            break
        if left[layer] > 1:
            removed.add((layer, unit))
            left[layer] -= 1
    return [[u for u in range(len(s)) if (layer, u) not in removed]
            for layer, s in enumerate(scores)]


# --------------------------------------------------------------------------- cutting weights


def prune_model(model: nn.Module, kept_heads: list[list[int]],
                kept_ffn: list[list[int]]) -> nn.Module:
    """A new model of `model`'s head with only the kept heads and FFN neurons of each block
    (indices into the block's current units), its weights cut from `model`'s; `model` is left
    as it was. Keeping everything gives an identical copy (same config, same weights)."""
    c = model.config
    d, gated = c.head_dim, c.activation == "geglu"
    state = dict(model.state_dict())
    layer_heads, layer_ffn = [], []
    for i, block in enumerate(model.backbone.blocks):
        h, f = kept_heads[i], kept_ffn[i]
        current = c.kept_heads(i) or list(range(c.heads))
        layer_heads.append([current[k] for k in h])  # indices into the unpruned model's heads
        layer_ffn.append(len(f))
        p = f"backbone.blocks.{i}."
        rows_h = torch.tensor(h, dtype=torch.long)
        rows_f = torch.tensor(f, dtype=torch.long)
        n_heads, width = block.attention.heads, block.ffn.down.in_features
        w = state[p + "attention.qkv.weight"]  # (3 * heads * d, hidden): q, k, v blocks
        state[p + "attention.qkv.weight"] = w.view(3, n_heads, d, -1)[:, rows_h].reshape(
            -1, w.shape[-1])
        state[p + "attention.qkv.bias"] = state[p + "attention.qkv.bias"].view(
            3, n_heads, d)[:, rows_h].reshape(-1)
        w = state[p + "attention.out.weight"]  # (hidden, heads * d)
        state[p + "attention.out.weight"] = w.view(w.shape[0], n_heads, d)[:, rows_h].reshape(
            w.shape[0], -1)
        parts = 2 if gated else 1  # GEGLU: gate units, then value units
        w = state[p + "ffn.up.weight"]  # (parts * width, hidden)
        state[p + "ffn.up.weight"] = w.view(parts, width, -1)[:, rows_f].reshape(
            -1, w.shape[-1])
        state[p + "ffn.up.bias"] = state[p + "ffn.up.bias"].view(parts, width)[
            :, rows_f].reshape(-1)
        state[p + "ffn.down.weight"] = state[p + "ffn.down.weight"][:, rows_f]
    full_heads = all(len(h) == c.heads for h in layer_heads)
    config = c.replace(layer_heads=None if full_heads else layer_heads,
                       layer_ffn=None if all(w == c.ffn for w in layer_ffn) else layer_ffn)
    pruned = HEADS[type(model).__name__](config, **getattr(model, "head_kwargs", {}))
    load_weights(pruned, {k: v.clone() for k, v in state.items()}, "pruned weights",
                 strict=True)
    pruned.vocab_hash = getattr(model, "vocab_hash", None)
    return pruned.to(next(model.parameters()).device).train(model.training)


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Heads and FFN width of every block."""
    blocks = model.backbone.blocks
    return {"heads": [b.attention.heads for b in blocks],
            "ffn": [b.ffn.down.in_features for b in blocks]}


def torch_latency_ms(model: nn.Module, batch: dict[str, Tensor], reps: int = 10) -> float:
    """Median wall time of one forward pass over `batch` (no grad, eval mode), in ms."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            t0 = time.perf_counter()
            model(**inputs)
            if i >= 2:  # the first two warm up allocator and kernels
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# --------------------------------------------------------------------------- the verb


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UserError(f"--{name} {value}: the fraction of {name} units to remove must be in "
                        "[0, 1) (0 keeps all; every layer keeps at least one)")


def load_classifier(model: Path, task: str | None = None) -> tuple[nn.Module, TaskCard, Path]:
    """The fine-tuned classifier at `model` and its task card (fine-tuned on `task` when
    given); a UserError naming --model for anything else."""
    directory = resolve_model_dir(model)
    card = TaskCard.read_optional(directory)
    if card is None:
        raise UserError(f"--model {model}: no task.json, so not a fine-tuned classifier; prune a "
                        "model written by `motian finetune` (out/seed-N/model)")
    if card.type not in TASK_TYPES:
        raise UserError(f"--model {model}: fine-tuned on a {card.type!r} task ({card.name}); "
                        f"prune supports classification ({', '.join(TASK_TYPES)})")
    if task is not None and task not in (card.name, card.format):
        raise UserError(f"--task {task}: --model {model} was fine-tuned on {card.name!r}; "
                        "prune on the model's own task (or leave --task out)")
    net = from_pretrained(directory)
    if type(net).__name__ not in CLASSIFIERS:
        raise UserError(f"--model {model}: a {type(net).__name__} model; prune supports "
                        f"{', '.join(CLASSIFIERS)}")
    if net.config.attention != "full":
        raise UserError(f"--model {model}: attention={net.config.attention!r}; prune supports "
                        "full attention only")
    return net, card, directory


@dist_utils.in_process_group
def prune(model: Path, out: Path, task: str | None = None, heads: float = 0.5, ffn: float = 0.5,
          recovery_epochs: float = 1.0, distill: bool = True, temperature: float = 2.0,
          alpha_soft: float = 1.0, alpha_hard: float = 0.5, importance_examples: int = 1024,
          data: Path | None = None, max_train: int | None = None, max_eval: int | None = None,
          batch_size: int = 32, warmup: float = 0.1, seed: int = 1,
          optim: OptimSettings = OptimSettings(lr=1e-4), run: RunSettings = RunSettings(), *,
          info: DistInfo) -> dict:
    """Prune attention heads and FFN neurons of a fine-tuned classifier, then recover.

    Ranks heads and FFN neurons by |gradient x mask| on the task's training data (Michel et
    al. 2019; normalised per layer), removes the lowest fractions from the weights, and
    fine-tunes the smaller model briefly (by default distilled from the unpruned one).
    Prints dev/test accuracy before pruning, after it and after recovery, the parameters and
    the PyTorch latency of one batch. out/ is a model directory (export, predict, serve and
    evaluate read it) with prune.json holding the numbers.

    Args:
        model: a fine-tuned classifier (out/seed-N/model of `motian finetune` or `distill`).
        out: directory to write the pruned model to.
        task: the task to prune on (default: the model's own; must match it).
        heads: fraction of all attention heads to remove, in [0, 1).
        ffn: fraction of all FFN neurons to remove, in [0, 1).
        recovery_epochs: passes over the training data after pruning (0: none).
        distill: recover with the unpruned model as teacher (soft targets + labels); off:
            labels only.
        temperature: softmax temperature of the teacher's soft targets.
        alpha_soft: weight of the soft-target KL (times T^2) in recovery.
        alpha_hard: weight of the task loss on the gold labels in recovery.
        importance_examples: training examples the importance is measured on (a fixed
            pseudo-random sample of the training split).
        data: directory with the task's files (CLUE tasks and your own).
        max_train: use only N training examples for recovery.
        max_eval: use only N dev and test examples.
        batch_size: examples per optimizer step and per importance batch.
        warmup: fraction of the recovery steps spent warming up.
        seed: random seed of the recovery.
        optim: the optimiser and its settings (recovery).
        run: how the run executes (device, precision, micro-batch, ...).
    """
    check_fraction("heads", heads)
    check_fraction("ffn", ffn)
    if recovery_epochs < 0 or importance_examples < 1:
        raise UserError("--recovery-epochs must be >= 0 and --importance-examples >= 1")
    out = Path(out)
    teacher, card, source = load_classifier(Path(model), task)
    the_task = load_card_task(card, data)
    card.check_labels(the_task.labels, source)
    tok = load_tokenizer(source / "tokenizer.json")
    special = special_token_ids(tok)
    featurize = Featurizer(the_task, tok, special, card.max_length)
    pad = special["pad"]
    teacher.to(info.device)
    measure = _Measure(the_task, featurize, pad, info.device, run.precision, max_eval,
                       batch_size)
    result: dict = {"model": str(source),
                    "model_sha256": sha256_file(source / "model.safetensors"),
                    "task": the_task.name, "heads": heads, "ffn": ffn,
                    "timing_batch": list(measure.timing["input_ids"].shape),
                    "before": measure.describe(teacher)}
    sample = featurize(subset(the_task.splits["train"], importance_examples))
    batches = [measure.batch(sample[i:i + batch_size]) for i in range(0, len(sample), batch_size)]
    head_scores, ffn_scores = unit_importance(teacher, the_task.type, batches)
    pruned = prune_model(teacher, choose_kept(head_scores, heads), choose_kept(ffn_scores, ffn))
    result["pruned"] = measure.describe(pruned)
    if recovery_epochs > 0:
        weights = (LossWeights(soft=alpha_soft, hard=alpha_hard, temperature=temperature)
                   if distill else LossWeights(soft=0.0, hard=1.0))
        objective = Distiller(teacher if weights.needs_teacher else None, pruned,
                              task_outputs(the_task.type), weights,
                              list(range(pruned.config.layers)))
        settings = TaskTraining(epochs=recovery_epochs, batch_size=batch_size, warmup=warmup)
        record = {k: result[k] for k in ("model_sha256", "task", "heads", "ffn")}
        record.update(recovery_epochs=recovery_epochs, weights=asdict(weights),
                      max_train=max_train, optim=repr(optim), batch_size=batch_size)
        seed_everything(seed)
        train = featurize(subset(the_task.splits["train"], max_train))
        stats = train_on_features(objective, train, the_task.type, pad, settings, optim, run,
                                  info, seed, out / "recovery", fingerprint(record, seed), 0,
                                  "prune recovery", card.max_length)
        result["recovered"] = {**measure.describe(pruned), "steps": stats["steps"],
                               "final_loss": stats["final_loss"], "distilled": distill}
    if info.is_main:
        save_fine_tuned(pruned, the_task, tok, card.max_length, out)
        write_json_atomic(out / RESULT, result)
        remove_checkpoints(out / "recovery")
        print(summary(result))
    return result


class _Measure:
    """What `prune` reports of a model: parameters, layer sizes, dev/test scores and the
    PyTorch latency of one batch of `batch_size` dev examples."""

    def __init__(self, task: Task, featurize: Featurizer, pad: int, device: torch.device,
                 precision: str, max_eval: int | None, batch_size: int):
        self.task, self.featurize, self.pad = task, featurize, pad
        self.device, self.precision = device, precision
        self.evals = {s: subset(task.splits.get(s, []), max_eval) for s in ("dev", "test")}
        self.timing = self.batch(featurize(self.evals["dev"] or task.splits["train"])[:batch_size])

    def batch(self, features: list) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in collate(self.task.type, features,
                                                         self.pad).items()}

    def scores(self, net: nn.Module) -> dict:
        result = {}
        for split, examples in self.evals.items():
            if examples:
                s, _ = _evaluate_split(net, self.task, split, examples, self.featurize,
                                       self.pad, self.device, 64, Path("."), self.precision,
                                       write=False)
                if s is not None:
                    result[split] = s
        return result

    def describe(self, net: nn.Module) -> dict:
        return {"params": count_parameters(net),
                "encoder_params": count_parameters(net.backbone.blocks), **layer_sizes(net),
                "torch_ms_per_batch": round(torch_latency_ms(net, self.timing), 2),
                "scores": self.scores(net)}


def summary(result: dict) -> str:
    """The before / pruned / recovered table printed by `motian prune`."""
    scored = [r["scores"][s] for r in (result["before"],) for s in r["scores"]]
    metric = "accuracy" if not scored or "accuracy" in scored[0] else "f1"  # token tasks: F1
    lines = [f"{result['task']}: pruned {result['heads']:.0%} of heads, {result['ffn']:.0%} of "
             f"FFN neurons (batch {'x'.join(map(str, result['timing_batch']))} for latency)",
             f"{'model':<10} {'params':>10} {'encoder':>9} {'heads':>6} {'ffn':>6} "
             f"{'dev ' + metric:>13} {'test ' + metric:>14} {'torch ms':>9}"]
    for name in ("before", "pruned", "recovered"):
        r = result.get(name)
        if r is None:
            continue
        acc = {s: f"{r['scores'][s][metric] * 100:.2f}" if s in r["scores"] else "-"
               for s in ("dev", "test")}
        lines.append(f"{name:<10} {r['params']:>10,} {r['encoder_params']:>9,} "
                     f"{sum(r['heads']):>6} {sum(r['ffn']):>6} {acc['dev']:>13} "
                     f"{acc['test']:>14} {r['torch_ms_per_batch']:>9.2f}")
    return "\n".join(lines)
