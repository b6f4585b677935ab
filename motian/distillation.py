"""`motian distill` and `motian distill-corpus`: knowledge distillation of a teacher into a
smaller student (fewer layers and/or a smaller hidden size).

Task-specific (`distill`): the teacher is a model written by `motian finetune`; the student has
the same head and learns, through the one training loop (`motian.train.fit`, with the
`Distiller` objective in place of the task loss), from up to four signals, each weighted:

* soft targets: KL(teacher || student) of the logits at temperature T, times T^2 so its
  gradient keeps its scale as T changes (Hinton et al. 2015);
* hard labels: the task's own loss;
* hidden states: MSE between student layer i and teacher layer map[i], the embeddings output
  included, through a learned linear projection when the hidden sizes differ (TinyBERT,
  Jiao et al. 2020);
* attention maps: KL between the attention probabilities of the mapped layers, per query row
  (MiniLM, Wang et al. 2020), averaged over heads when the head counts differ.

The layer map pairs student block i (0-based) with teacher block map[i]; by default the blocks
are evenly spaced and the last student block matches the last teacher block:
map[i] = (i + 1) * T // S - 1, so 4 -> 2 takes blocks 1 and 3, 12 -> 4 takes 2, 5, 8, 11.
With `init="teacher-layers"` the student also starts from those blocks (and the teacher's
embeddings and head). When the student is narrower, each weight is cut from the teacher's by
"weight selection" (Xu et al. 2024, "Initializing Models with Larger Ones"): the first
hidden' residual dimensions, the first head_dim' dimensions of the first heads' heads and the
first ffn' units, chosen consistently in every layer so the residual stream stays aligned.

The baseline is the same student, same initialisation and schedule, trained on the hard labels
alone: the difference between the two is what the teacher's signals bought.

Task-agnostic (`distill_corpus`): a pretrained teacher's masked-LM logits (soft) and hidden
states teach a student MaskedLM on encoded shards, with the pretraining loader (packing and
masking) as the data path; the result is a checkpoint `motian finetune --model` starts from.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.shards import EncodedDataset
from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.errors import UserError
from motian.finetuning import (
    DEFAULT_SEEDS,
    _evaluate_split,
    fingerprint,
    load_card_task,
    remove_checkpoints,
    save_fine_tuned,
    settings_record,
    subset,
)
from motian.io import sha256_file, write_json_atomic, write_text_atomic
from motian.model.artifact import (
    TaskCard,
    check_vocab,
    load_backbone_state,
    load_task_model,
    model_vocab_hash,
    resolve_model_dir,
)
from motian.model.config import ModelConfig
from motian.model.heads import MaskedLM, masked_lm_logits, mlm_loss
from motian.model.io import (
    count_parameters,
    load_weights,
    save_pretrained,
)
from motian.model.transformer import capture_internals
from motian.reporting.tables import distill_results_page, summarise, summary_text
from motian.task_training import (
    TaskTraining,
    optimizer_groups,
    seed_everything,
    train_on_features,
)
from motian.tasks.features import Featurizer
from motian.tasks.heads import batch_loss, build_head
from motian.tasks.types import Task
from motian.train import distributed as dist_utils
from motian.train.distributed import DistInfo
from motian.train.fit import FitConfig, Objective, fit
from motian.train.metrics import MetricsLogger, read_metrics
from motian.train.settings import OptimSettings, RunSettings, Stage

Init = Literal["teacher-layers", "fresh"]


@dataclass
class LossWeights:
    """How much each signal counts (0 = off; an off signal costs nothing)."""

    soft: float = 1.0
    hard: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    temperature: float = 1.0

    @property
    def needs_teacher(self) -> bool:
        return bool(self.soft or self.hidden or self.attention)


# --------------------------------------------------------------------------- the student


def even_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks (0-based), the last student block on the last teacher one."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def parse_layer_map(spec: str | None, teacher_layers: int, student_layers: int) -> list[int]:
    """`spec` "1,3" (0-based teacher blocks, one per student block), or the even map."""
    if spec is None or not spec.strip():
        return even_layer_map(teacher_layers, student_layers)
    try:
        mapping = [int(x) for x in spec.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"--layer-map {spec!r}: give comma-separated teacher block numbers "
                        "(0-based), e.g. 1,3") from None
    if len(mapping) != student_layers:
        raise UserError(f"--layer-map {spec!r} names {len(mapping)} teacher blocks but the "
                        f"student has {student_layers} layers; give one per student layer")
    bad = [m for m in mapping if not 0 <= m < teacher_layers]
    if bad:
        raise UserError(f"--layer-map {spec!r}: block(s) {bad} out of range; the teacher has "
                        f"blocks 0..{teacher_layers - 1}")
    return mapping


def student_config(teacher: ModelConfig, layers: int, hidden: int | None = None,
                   heads: int | None = None, ffn: int | None = None) -> ModelConfig:
    """The teacher's config with fewer layers and/or a narrower width. By default the head count
    stays (narrower heads) and the FFN keeps its ratio to the hidden size."""
    hidden = hidden or teacher.hidden
    heads = heads or teacher.heads
    ffn = ffn or max(1, teacher.ffn * hidden // teacher.hidden)
    if layers < 1 or layers > teacher.layers or hidden > teacher.hidden \
            or heads > teacher.heads or ffn > teacher.ffn:
        raise UserError(f"the student ({layers} layers, hidden {hidden}, {heads} heads, ffn "
                        f"{ffn}) must not be bigger than the teacher ({teacher.layers} layers, "
                        f"hidden {teacher.hidden}, {teacher.heads} heads, ffn {teacher.ffn})")
    if hidden % heads:
        raise UserError(f"student hidden {hidden} is not divisible by {heads} heads; pass "
                        "--student-heads")
    return teacher.replace(layers=layers, hidden=hidden, heads=heads, ffn=ffn)


def _selection(key: str, dim: int, n: int, teacher: ModelConfig, student: ModelConfig) -> Tensor:
    """Indices of the teacher rows kept along `dim` of weight `key` (weight selection)."""
    def per_head(parts: int) -> Tensor:  # (parts, heads, head_dim) layout -> first of each
        t, s = teacher, student
        return torch.tensor([p * t.hidden + h * t.head_dim + j for p in range(parts)
                             for h in range(s.heads) for j in range(s.head_dim)])

    if key.endswith("attention.qkv.weight") and dim == 0 or key.endswith("attention.qkv.bias"):
        return per_head(3)
    if key.endswith("attention.out.weight") and dim == 1:
        return per_head(1)
    if key.endswith("ffn.up.weight") and dim == 0 or key.endswith("ffn.up.bias"):
        if student.activation == "geglu":  # (gate | value) halves
            return torch.cat([torch.arange(student.ffn), teacher.ffn + torch.arange(student.ffn)])
    return torch.arange(n)


def select_weight(value: Tensor, shape: torch.Size, key: str, teacher: ModelConfig,
                  student: ModelConfig) -> Tensor:
    """`value` cut down to `shape` along every dimension where they differ."""
    for dim, (have, want) in enumerate(zip(value.shape, shape)):
        if have != want:
            value = value.index_select(dim, _selection(key, dim, want, teacher, student))
    return value


def init_from_teacher(student: nn.Module, teacher: nn.Module, mapping: list[int]) -> None:
    """Copy the teacher's embeddings, head, shared position tables and blocks `mapping` into the
    student (weight-selected where the student is narrower)."""
    t_state, t_cfg, s_cfg = teacher.state_dict(), teacher.config, student.config
    new = {}
    for key, own in student.state_dict().items():
        source = key
        if key.startswith("backbone.blocks."):
            i, rest = key[len("backbone.blocks."):].split(".", 1)
            source = f"backbone.blocks.{mapping[int(i)]}.{rest}"
        if source not in t_state:
            raise UserError(f"cannot initialise the student from the teacher: no {source}")
        new[key] = select_weight(t_state[source], own.shape, key, t_cfg, s_cfg).clone()
    load_weights(student, new, "teacher", strict=True)


def encoder_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward matmul FLOPs per token of the encoder blocks (2 per multiply-add): q/k/v and
    output projections, the FFN, and the attention scores and weighted sum over `seq_len`
    keys. Embedding look-ups, norms, softmax and the task head are left out (not matmuls, or
    the same for teacher and student). A pruned model (`layer_heads` / `layer_ffn`) is
    counted layer by layer with the heads and FFN units it kept."""
    H, d = config.hidden, config.head_dim
    total = 0
    for i in range(config.layers):
        heads = len(config.layer_heads[i]) if config.layer_heads is not None else config.heads
        ffn = config.layer_ffn[i] if config.layer_ffn is not None else config.ffn
        A = heads * d  # width of q, k, v and the attention output
        ffn_in = ffn * (2 if config.activation == "geglu" else 1)
        total += 3 * H * A + A * H + H * ffn_in + ffn * H + 2 * seq_len * A
    return 2 * total


# --------------------------------------------------------------------------- the losses


def soft_target_loss(student: Tensor, teacher: Tensor, temperature: float,
                     mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last dim, averaged over
    the rows (those where `mask` is true)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (...)
    kl = kl[mask] if mask is not None else kl
    return kl.mean() * temperature ** 2


def hidden_loss(student: list[Tensor], teacher: list[Tensor], pairs: list[tuple[int, int]],
                projections: nn.ModuleList | None, mask: Tensor | None) -> Tensor:
    """Mean over the layer pairs of the MSE between projected student and teacher states at
    the real tokens; states (B, L, hidden) with `mask` (B, L), or (N, hidden) rows."""
    losses = []
    for k, (i, j) in enumerate(pairs):
        hs, ht = student[i], teacher[j]
        if projections is not None:
            hs = projections[k](hs)
        if hs.dim() == 3 and mask is not None:
            hs, ht = hs[mask], ht[mask]  # (N, hidden)
        losses.append(F.mse_loss(hs.float(), ht.float()))
    return torch.stack(losses).mean()


def attention_loss(student: list[Tensor], teacher: list[Tensor], mapping: list[int],
                   mask: Tensor | None, eps: float = 1e-8) -> Tensor:
    """KL(teacher || student) of the attention distribution of every real query, student block
    i against teacher block mapping[i]; probabilities (B, heads, L, L)."""
    losses = []
    for i, j in enumerate(mapping):
        ps, pt = student[i].float(), teacher[j].float()
        if ps.shape[1] != pt.shape[1]:  # head counts differ: compare the heads' mean
            ps, pt = ps.mean(1, keepdim=True), pt.mean(1, keepdim=True)
        kl = (pt * ((pt + eps).log() - (ps + eps).log())).sum(-1)  # (B, h, L)
        if mask is not None:
            kl = kl.masked_select(mask[:, None, :].expand_as(kl))
        losses.append(kl.mean())
    return torch.stack(losses).mean()


# (model, batch) -> (hard loss or None, [logits tensors], token mask (B, L) or None)
Outputs = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor | None, list[Tensor],
                                                         Tensor | None]]


class Distiller(Objective):
    """The distillation objective: `loss(batch)` runs the frozen teacher and the student and
    returns the weighted sum of the signals (a mean over the batch); `parts` keeps the last
    batch's terms. Owns the hidden-state projections (trained with the student, saved with
    its checkpoints, not with the student model). The student is `self.model`."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, outputs: Outputs,
                 weights: LossWeights, mapping: list[int]):
        super().__init__()
        self.teacher, self.model, self.outputs = teacher, student, outputs
        self.weights, self.mapping = weights, mapping
        self.pairs = [(0, 0)] + [(i + 1, j + 1) for i, j in enumerate(mapping)]
        hs, ht = student.config.hidden, teacher.config.hidden if teacher else 0
        self.projections = (nn.ModuleList(nn.Linear(hs, ht) for _ in self.pairs)
                            if weights.hidden and hs != ht else None)
        self.parts: dict[str, float] = {}
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    @property
    def student(self) -> nn.Module:
        return self.model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never trains (no dropout)
        return self

    def units(self, batch: dict[str, Tensor]) -> float:
        """Rows: every signal is a mean over the micro-batch, weighted by its rows."""
        return float(batch["input_ids"].shape[0])

    def forward(self, batch: dict[str, Tensor], units_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        n = self.units(batch)
        terms = self._terms(batch)
        total = sum(terms.values())
        stats = {f"{k}_sum": v.detach() * n for k, v in terms.items()}
        stats.update({"loss_sum": total.detach() * n, "units": torch.tensor(n)})
        return total * (n / units_per_rank), stats

    def param_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self.model, weight_decay, 1.0, self.projections)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the signals on `batch` (a mean over its rows)."""
        return sum(self._terms(batch).values())

    def _terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w = self.weights
        attn = bool(w.attention)
        with capture_internals(self.model.backbone, attn) as s_rec:
            hard, s_logits, mask = self.outputs(self.model, batch)
        terms: dict[str, Tensor] = {}
        if w.hard and hard is not None:
            terms["hard"] = w.hard * hard
        if w.needs_teacher:
            with torch.no_grad(), capture_internals(self.teacher.backbone, attn) as t_rec:
                _, t_logits, _ = self.outputs(self.teacher, batch)
            if w.soft:
                terms["soft"] = w.soft * sum(
                    soft_target_loss(s, t, w.temperature, mask if s.dim() == 3 else None)
                    for s, t in zip(s_logits, t_logits)) / len(s_logits)
            if w.hidden:
                terms["hidden"] = w.hidden * hidden_loss(s_rec.hidden, t_rec.hidden, self.pairs,
                                                         self.projections, mask)
            if attn:
                terms["attention"] = w.attention * attention_loss(
                    s_rec.attention, t_rec.attention, self.mapping, mask)
        self.parts = {k: float(v.detach()) for k, v in terms.items()}
        return terms


def task_outputs(task_type: str) -> Outputs:
    """Outputs of a task head: its loss, its logits (start and end for spans), the real-token
    mask (token-level logits are compared only there)."""
    def outputs(model: nn.Module, batch: dict[str, Tensor]):
        hard, out = batch_loss(task_type, model, batch)
        logits = [out.logits] + ([out.end_logits] if task_type == "span" else [])
        L = batch["input_ids"].shape[-1]
        return hard, logits, batch["attention_mask"].reshape(-1, L).bool()
    return outputs


# --------------------------------------------------------------------------- task distillation


def load_teacher(teacher: Path, task: str | None) -> tuple[nn.Module, TaskCard]:
    """The fine-tuned teacher model and its task card, checked against `task`."""
    model, card = load_task_model(teacher)
    if task is not None and task not in (card.name, card.format):
        raise UserError(f"{teacher}: the teacher was fine-tuned on {card.name!r}, not "
                        f"{task!r}; distil on the teacher's task or give another teacher")
    return model, card


@dist_utils.in_process_group
def distill(teacher: Path, out: Path, task: str | None = None, student_layers: int = 0,
            student_hidden: int | None = None, student_heads: int | None = None,
            student_ffn: int | None = None, init: Init = "teacher-layers",
            layer_map: str | None = None, temperature: float = 2.0, alpha_soft: float = 1.0,
            alpha_hard: float = 0.5, alpha_hidden: float = 0.0, alpha_attention: float = 0.0,
            baseline: bool = True, data: Path | None = None, seeds: list[int] | None = None,
            epochs: float = 3.0, batch_size: int = 32, warmup: float = 0.1,
            max_train: int | None = None, max_eval: int | None = None,
            checkpoint_every: int = 200, optim: OptimSettings = OptimSettings(lr=1e-4),
            run: RunSettings = RunSettings(), *, info: DistInfo) -> dict:
    """Distil a fine-tuned teacher into a smaller student; report teacher, student and the
    non-distilled baseline student with the compute ratio.

    Writes out/seed-N/ (the student: result.json, model loadable by predict/export/evaluate),
    out/baseline/seed-N/, out/results.json and out/results.md. Finished seeds are reused.

    Args:
        teacher: a fine-tuned model directory (out/seed-N/model of `motian finetune`).
        out: run directory.
        task: the task to distil on (default: the teacher's; must match it).
        student_layers: student blocks (default: half the teacher's, at least 1).
        student_hidden: student hidden size (default: the teacher's).
        student_heads: student attention heads (default: the teacher's).
        student_ffn: student FFN size (default: the teacher's ratio to hidden).
        init: teacher-layers (copy the mapped blocks, weight-selected if narrower) or fresh.
        layer_map: teacher block (0-based) per student block, e.g. 1,3 (default: evenly
            spaced, last on last).
        temperature: softmax temperature of the soft targets.
        alpha_soft: weight of the soft-target KL (times T^2).
        alpha_hard: weight of the task loss on the gold labels.
        alpha_hidden: weight of the hidden-state MSE (embeddings + every mapped block).
        alpha_attention: weight of the attention-probability KL of the mapped blocks.
        baseline: also train the same student on the hard labels alone (no teacher).
        data: directory with the CLUE task's files (CLUE tasks only).
        seeds: random seeds, one student each (default 1 2 3).
        epochs: passes over the training data.
        batch_size: examples per optimizer step (the global batch).
        warmup: fraction of the steps spent warming up (then linear decay to 0).
        max_train: use only N training examples.
        max_eval: use only N dev and test examples.
        checkpoint_every: optimizer steps between checkpoints of a student (0 = only at its
            end); an interrupted student continues exactly from its latest one.
        optim: the optimiser and its settings.
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    out = Path(out)
    t_model, card = load_teacher(teacher, task)
    the_task = load_card_task(card, data)
    card.check_labels(the_task.labels, teacher)
    t_cfg = t_model.config
    s_cfg = student_config(t_cfg, student_layers or max(1, t_cfg.layers // 2), student_hidden,
                           student_heads, student_ffn)
    mapping = parse_layer_map(layer_map, t_cfg.layers, s_cfg.layers)
    if info.is_main:
        print("layer map (student block <- teacher block, 0-based): "
              + ", ".join(f"{i} <- {j}" for i, j in enumerate(mapping)), file=sys.stderr)
    weights = LossWeights(alpha_soft, alpha_hard, alpha_hidden, alpha_attention, temperature)
    settings = TaskTraining(epochs=epochs, batch_size=batch_size, warmup=warmup)
    config = {"teacher": str(teacher), "teacher_sha256": sha256_file(
        Path(teacher) / "model.safetensors"), "task": the_task.name, "student": s_cfg.to_dict(),
        "init": init, "layer_map": mapping, "weights": asdict(weights),
        "max_length": card.max_length, "max_train": max_train, "max_eval": max_eval,
        "epochs": epochs, "batch_size": batch_size, "warmup": warmup,
        **{k: v for k, v in settings_record(settings, optim).items()
           if k in ("optimizer", "lr", "weight_decay", "clip_norm", "betas", "eps", "decay",
                    "min_ratio", "cut_frac", "ratio")}}
    tok = load_tokenizer(Path(teacher) / "tokenizer.json")
    special = special_token_ids(tok)
    runner = _Run(the_task, tok, special, Featurizer(the_task, tok, special, card.max_length),
                  max_eval, info, t_model.to(info.device), s_cfg, init, mapping, settings,
                  optim, run, checkpoint_every)
    examples = subset(the_task.splits["train"], max_train)
    features = runner.featurize(examples)
    out = Path(out)
    arms = {"student": (out, weights)}
    if baseline:
        arms["baseline"] = (out / "baseline", LossWeights(soft=0.0, hard=1.0))
    result = {"task": {"name": the_task.name, "type": the_task.type,
                       "train_used": len(examples)},
              "teacher": _describe(t_model, card.max_length, sha256=config["teacher_sha256"],
                                   path=str(teacher), scores=runner.teacher_scores(out)),
              "config": config}
    for name, (directory, w) in arms.items():
        runs = [runner.seed(seed, directory / f"seed-{seed}", {**config, "weights": asdict(w)},
                            w, features) for seed in (seeds or DEFAULT_SEEDS)]
        result[name] = {**_describe(build_head(the_task, s_cfg), card.max_length),
                        "runs": runs, "summary": summarise(runs)}
    result["compute_ratio"] = result["student"]["flops_per_token"] / result["teacher"][
        "flops_per_token"]
    if info.is_main:
        write_json_atomic(out / "results.json", result)
        page = distill_results_page(result)
        write_text_atomic(out / "results.md", page)
        print(summary_text(page))
    return result


def _describe(model: nn.Module, seq_len: int, **extra) -> dict:
    c = model.config
    return {"layers": c.layers, "hidden": c.hidden, "heads": c.heads, "ffn": c.ffn,
            "params": count_parameters(model), "flops_per_token": encoder_flops_per_token(
                c, seq_len), "flops_seq_len": seq_len, **extra}


@dataclass
class _Run:
    """What every seed of a distillation run shares."""

    task: Task
    tok: object
    special: dict[str, int]
    featurize: Featurizer
    max_eval: int | None
    info: DistInfo
    teacher: nn.Module
    student_config: ModelConfig
    init: Init
    mapping: list[int]
    settings: TaskTraining
    optim: OptimSettings
    run: RunSettings
    checkpoint_every: int

    def evaluate(self, model: nn.Module, directory: Path) -> dict:
        scores = {}
        for split in ("dev", "test"):
            examples = subset(self.task.splits.get(split, []), self.max_eval)
            if examples:
                s, _ = _evaluate_split(model, self.task, split, examples, self.featurize,
                                       self.special["pad"], self.info.device, 64, directory,
                                       self.run.precision, write=self.info.is_main)
                if s is not None:
                    scores[split] = s
        return scores

    def teacher_scores(self, out: Path) -> dict:
        return self.evaluate(self.teacher, out / "teacher")

    def seed(self, seed: int, seed_dir: Path, config: dict, weights: LossWeights,
             features: list) -> dict:
        done = seed_dir / "result.json"
        if done.is_file() and json.loads(done.read_text("utf-8")).get("config") == config:
            if self.info.is_main:
                print(f"seed {seed}: finished earlier, reusing {done}", file=sys.stderr)
            return json.loads(done.read_text("utf-8"))["result"]
        if self.info.is_main:
            seed_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(seed)
        student = build_head(self.task, self.student_config)
        if self.init == "teacher-layers":
            init_from_teacher(student, self.teacher, self.mapping)
        distiller = Distiller(self.teacher if weights.needs_teacher else None, student,
                              task_outputs(self.task.type), weights, self.mapping)
        t0 = time.perf_counter()
        stats = train_on_features(distiller, features, self.task.type, self.special["pad"],
                                  self.settings, self.optim, self.run, self.info, seed,
                                  seed_dir, fingerprint(config, seed), self.checkpoint_every,
                                  f"distill seed {seed}", config["max_length"])
        result = {"seed": seed, "train_seconds": round(time.perf_counter() - t0, 2),
                  "steps": stats["steps"], "final_loss": stats["final_loss"],
                  "skipped_steps": stats["skipped_steps"],
                  "last_terms": {k: v for k, v in stats["last"].items()
                                 if k in ("soft", "hard", "hidden", "attention")},
                  **self.evaluate(student, seed_dir)}
        if self.info.is_main:
            save_fine_tuned(student, self.task, self.tok, config["max_length"],
                            seed_dir / "model")
            write_json_atomic(done, {"config": config, "result": result})
            remove_checkpoints(seed_dir)
        return result


# --------------------------------------------------------------------------- task-agnostic


def load_mlm_teacher(path: Path) -> MaskedLM:
    """A pretrained masked LM: a motian checkpoint or training run (its MLM head included), or
    a Hugging Face BERT directory."""
    b = load_backbone_state(path)
    source = str(b.weights or path)
    if not any(k.startswith("mlm.") for k in b.state):
        raise UserError(f"{source}: no masked-LM head; task-agnostic distillation needs a "
                        "pretrained model (motian pretrain output), not a fine-tuned one")
    model = MaskedLM(b.config)
    model.vocab_hash = model_vocab_hash(b.weights.parent) if b.weights else None
    load_weights(model, {k: v for k, v in b.state.items()
                         if k.startswith(("backbone.", "mlm."))}, source, strict=True)
    return model


def mlm_outputs(model: nn.Module, batch: dict[str, Tensor]):
    """Outputs of a MaskedLM on a pretraining batch: its MLM loss, the logits (N, vocab) at the
    masked positions, the real-token mask (B, L). The last block runs at every position (not
    only the masked rows, as in pretraining) because its hidden states are matched too."""
    h = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                     batch.get("position_ids"), batch.get("document_ids"))  # (B, L, hidden)
    logits = masked_lm_logits(model, h.reshape(-1, h.shape[-1])[batch["mlm_positions"]])
    return mlm_loss(logits, batch["mlm_labels"]), [logits], batch["attention_mask"].bool()


class CorpusBatches:
    """The `BatchSource` of task-agnostic distillation: packed, masked rows of the shards."""

    def __init__(self, data: Path, tokenizer: Path | None, seed: int):
        self.data, self.tokenizer, self.seed, self.loader = data, tokenizer, seed, None

    def start(self, stage: int, spec: Stage, micro: int, info: DistInfo, state: dict | None):
        self.loader = PackedLoader(self.data, self.tokenizer, LoaderConfig(
            seq_len=spec.seq_len, batch_size=micro, seed=self.seed, rank=info.rank,
            world_size=info.world_size))
        if state is not None:
            self.loader.load_state_dict(state)
        return iter(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader is not None else {}


@dist_utils.in_process_group
def distill_corpus(teacher_model: Path, data: Path, out: Path, tokenizer: Path | None = None,
                   student_layers: int = 0, student_hidden: int | None = None,
                   student_heads: int | None = None, student_ffn: int | None = None,
                   init: Init = "teacher-layers", layer_map: str | None = None,
                   temperature: float = 1.0, alpha_soft: float = 1.0, alpha_hard: float = 0.0,
                   alpha_hidden: float = 1.0, alpha_attention: float = 0.0, steps: int = 1000,
                   batch_size: int = 32, seq_len: int = 128, warmup: float = 0.1,
                   seed: int = 0, checkpoint_every: int = 200,
                   allow_vocab_mismatch: bool = False,
                   optim: OptimSettings = OptimSettings(lr=5e-4),
                   run: RunSettings = RunSettings(), *, info: DistInfo) -> dict:
    """Task-agnostic distillation: a student masked LM learns a pretrained teacher's MLM logits
    and hidden states on encoded shards; fine-tune the result with `motian finetune --model
    out/model`. An interrupted run resumes exactly from its latest checkpoint.

    Args:
        teacher_model: a pretrained model: motian checkpoint / training run, or HF BERT dir.
        data: encoded shards (a directory written by `motian encode`).
        out: run directory (out/model is the student, out/results.json the record,
            out/metrics.jsonl one record per step).
        tokenizer: the tokenizer the shards were encoded with (default: data/vocab.txt).
        student_layers: student blocks (default: half the teacher's, at least 1).
        student_hidden: student hidden size (default: the teacher's).
        student_heads: student attention heads (default: the teacher's).
        student_ffn: student FFN size (default: the teacher's ratio to hidden).
        init: teacher-layers (copy the mapped blocks, weight-selected if narrower) or fresh.
        layer_map: teacher block (0-based) per student block (default: evenly spaced).
        temperature: softmax temperature of the soft MLM targets.
        alpha_soft: weight of the KL to the teacher's MLM distribution (times T^2).
        alpha_hard: weight of the MLM loss on the true tokens.
        alpha_hidden: weight of the hidden-state MSE.
        alpha_attention: weight of the attention-probability KL.
        steps: optimizer steps.
        batch_size: rows per step (the global batch).
        seq_len: tokens per row.
        warmup: fraction of the steps spent warming up (then linear decay to 0).
        seed: data order, masking and initialisation seed.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        allow_vocab_mismatch: distil on shards encoded with another vocabulary than the
            teacher's (refused by default: token ids would mean other tokens).
        optim: the optimiser and its settings.
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    data, out = Path(data), Path(out)
    weights = LossWeights(alpha_soft, alpha_hard, alpha_hidden, alpha_attention, temperature)
    teacher = load_mlm_teacher(teacher_model)
    data_hash = EncodedDataset(data).manifest.get("vocab_hash")
    check_vocab(model_vocab_hash(resolve_model_dir(Path(teacher_model))), data_hash,
                teacher_model, f"the shards in {data}", allow_vocab_mismatch)
    s_cfg = student_config(teacher.config, student_layers or max(1, teacher.config.layers // 2),
                           student_hidden, student_heads, student_ffn)
    mapping = parse_layer_map(layer_map, teacher.config.layers, s_cfg.layers)
    vocab = PackedLoader(data, tokenizer, LoaderConfig(seq_len=seq_len, batch_size=1)).vocab
    if len(vocab) > s_cfg.vocab_size:
        raise UserError(f"{data}: encoded with {len(vocab)} tokens but the teacher has "
                        f"{s_cfg.vocab_size}; use shards encoded with the teacher's tokenizer")
    seed_everything(seed)
    student = MaskedLM(s_cfg)
    student.vocab_hash = data_hash
    if init == "teacher-layers":
        init_from_teacher(student, teacher, mapping)
    distiller = Distiller(teacher, student, mlm_outputs, weights, mapping)
    config = {"teacher": str(teacher_model), "data": str(data), "student": s_cfg.to_dict(),
              "init": init, "layer_map": mapping, "weights": asdict(weights), "steps": steps,
              "batch_size": batch_size, "seq_len": seq_len, "warmup": warmup, "seed": seed,
              **settings_record(TaskTraining(), optim)}
    for key in ("epochs", "layer_lr_decay", "unfreeze", "aux_mlm", "mask_rate"):
        config.pop(key)  # fine-tuning's, not this run's
    fit_config = FitConfig(optim=optim, stages=(Stage(seq_len=seq_len, global_batch=batch_size,
                                                      warmup=warmup),),
                           steps=steps, schedule="warmup-decay", seed=seed,
                           checkpoint_every=checkpoint_every, log_every=1,
                           label="distill-corpus", fingerprint=fingerprint(config, seed))
    summary = fit(distiller, CorpusBatches(data, tokenizer, seed), fit_config, run, out, info,
                  resume=True, open_logger=(lambda: MetricsLogger(out)) if info.is_main else None)
    train = read_metrics(out / "metrics.jsonl", "train") if info.is_main else []
    last = summary["last"]
    losses = {"first_loss": train[0]["loss"] if train else math.nan,
              "final_loss": last.get("loss", math.nan),
              "last_terms": {k: v for k, v in last.items()
                             if k in ("soft", "hard", "hidden", "attention")}}
    result = {"config": config, "teacher": _describe(teacher, seq_len),
              "student": _describe(student, seq_len), "steps": steps, **losses}
    result["compute_ratio"] = result["student"]["flops_per_token"] / result["teacher"][
        "flops_per_token"]
    if info.is_main:
        save_pretrained(student, out / "model")
        tok_source = Path(tokenizer) if tokenizer is not None else Path(data) / "vocab.txt"
        load_tokenizer(tok_source).save(str(out / "model" / "tokenizer.json"))
        write_json_atomic(out / "results.json", result)
        print(f"student: {out / 'model'} ({result['compute_ratio']:.3f} × the teacher's "
              f"compute); last loss {losses['final_loss']:.4f} {losses['last_terms']}")
    return result
