"""`motian pretrain`: train a recipe on encoded shards (one process, or every rank of torchrun).

    motian pretrain --recipe demo --data runs/demo/encoded --out runs/demo/pretrain
    torchrun --nproc_per_node 2 -m motian.cli pretrain --recipe demo ...   # several processes
    motian pretrain ... --resume                                            # after a kill

The recipe (a shipped name or a YAML path) fixes what is trained; the options either change the
run's length or only how it runs (device, precision, micro-batch, compile, ...).

Pretraining is the one loop (`motian.train.fit.fit`) with three pieces made here from the
recipe: the `Pretrainer` objective (MLM + pair task, or causal LM, with the task weighting and
the common held-out evaluation), `PretrainBatches` (packed, masked rows of the training
documents, one loader per stage) and the `FitConfig` (stages, schedule, checkpoints). This file
also writes what belongs to a pretraining run: recipe.yaml, run.json, the tokenizer copy,
final/ and summary.json.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from motian.data.inspect import options_loader, show_batch
from motian.data.loader import LoaderConfig
from motian.data.masking import MaskingConfig
from motian.data.shards import EncodedDataset
from motian.data.splits import SplitLoader, causal_batches, mass_batches
from motian.data.stream import StreamLoader, document_stream
from motian.errors import UserError
from motian.model.artifact import check_vocab, model_vocab_hash, resolve_model_dir
from motian.model.config import ModelConfig
from motian.train import distributed as dist_utils
from motian.train.checkpoint import latest_checkpoint
from motian.train.continual import ContinualBatches, build_continual_objective, continual
from motian.train.distributed import DistInfo
from motian.train.elmo import build_elmo_objective
from motian.train.fit import FitConfig, fit, resolve_precision
from motian.train.lock import hold_run_dir
from motian.train.mass import MaskedSeq2Seq, mass_eval_batches
from motian.train.meta_init import deferred
from motian.train.metrics import MetricsLogger, run_metadata
from motian.train.notes import NotesPretrainer, rare_words_for
from motian.train.objectives import (
    Pretrainer,
    TaskWeighting,
    build_model,
    init_weights_from,
    task_names,
)
from motian.train.recipe import DataSpec, EvalSpec, Recipe, to_dict, unilm_mode_shares
from motian.train.replaced import KINDS as REPLACED_KINDS
from motian.train.replaced import ReplacedTokens, replaced_eval_line
from motian.train.sbo import SpanBoundaryPretrainer
from motian.train.settings import RunSettings, Stage
from motian.train.unilm import UnifiedPretrainer
from motian.train.xl import build_xl_objective, check_xl_recipe
from motian.train.xlnet import PermutationLM, xlnet_eval_batches

LOG_EVERY = 10  # optimizer steps between metric records


def pretrain(recipe: str = "demo", data: Path = Path("runs/demo/encoded"),
             out: Path = Path("runs/pretrain"), resume: bool = False,
             init_from: Path | None = None, steps: int | None = None,
             budget_minutes: float | None = None, allow_vocab_mismatch: bool = False,
             override: list[str] | None = None, run: RunSettings = RunSettings()) -> dict:
    """Pretrain a model on encoded shards with a recipe; writes checkpoints, metrics and the
    final model under --out.

    Args:
        recipe: a recipe name (demo, motian-demo, bert-base, roberta-base, motian-base,
            motian-1b, spanbert-demo, notes-demo, gpt-demo, unilm-demo, mass-demo,
            xl-demo, xlnet-demo, ernie-demo, ernie2-demo, elmo-demo, longformer-demo)
            or a YAML file.
        data: a directory written by `motian encode` (or `motian prepare`'s out/encoded).
        out: run directory: checkpoints/, final/, metrics.jsonl, tensorboard/, run.json.
        resume: continue the run in --out from its latest checkpoint, exactly.
        init_from: start from these weights (motian checkpoint/model dir or a Hugging Face BERT
            dir); prints what was loaded and what is newly initialised.
        steps: total optimizer steps (overrides the recipe).
        budget_minutes: train for this many minutes instead of a step count; the learning-rate
            schedule follows the clock.
        allow_vocab_mismatch: let --init-from use a model trained with another vocabulary than
            the shards' (refused by default: its token ids would mean other tokens).
        override: recipe fields to change, section.field=value in YAML syntax, e.g.
            data.click_min_ctr=0.05 data.click_files=[clicks.tsv] data.pair_fraction=0.5.
        run: how the run executes (device, precision, micro-batch, ...): never the result.
    """
    from motian.train.recipe import load_recipe, with_fields, with_overrides

    if not Path(data).is_dir():
        raise UserError(f"--data {data}: not a directory; run `motian prepare` (or `motian "
                        "encode`) first and point --data at its encoded output")
    spec = load_recipe(recipe)
    if override:
        spec = with_fields(spec, override)
    spec = with_overrides(spec, steps=steps, budget_minutes=budget_minutes)
    summary = pretrain_recipe(spec, run, Path(data), Path(out), resume=resume,
                              init_from=init_from, allow_vocab_mismatch=allow_vocab_mismatch)
    if summary["rank"] != 0:
        return summary
    if summary.get("eval"):
        e = summary["eval"]
        kind = "next-token" if "perplexity" in e else "masked-token"
        if spec.objective.kind == "mass":
            kind = "masked-fragment (MASS decoder)"
        if spec.objective.kind == "elmo":
            kind = "biLM (forward and backward next-token)"
        if spec.objective.kind == "xlnet":
            kind = f"permutation-LM (last 1/{spec.objective.xlnet_k} of each order)"
        ppl = f", perplexity {e['perplexity']:.1f}" if "perplexity" in e else ""
        print(f"held-out {kind} accuracy {e['accuracy']:.2%}, loss {e['loss']:.3f}{ppl} "
              f"({e['tokens']:,} tokens)")
        if "perplexity_no_memory" in e:  # Transformer-XL: the same stream without memory
            print(f"held-out without memory: loss {e['loss_no_memory']:.3f}, perplexity "
                  f"{e['perplexity_no_memory']:.1f}")
        if "perplexity_forward" in e:  # ELMo: the line above is both directions'
            print(f"held-out forward LM: loss {e['loss_forward']:.3f}, perplexity "
                  f"{e['perplexity_forward']:.1f}; backward LM: loss {e['loss_backward']:.3f}, "
                  f"perplexity {e['perplexity_backward']:.1f}")
        if "rtd_accuracy" in e:  # ELECTRA / MC-BERT: the line above is the generator's
            print(replaced_eval_line(e))
    print(f"final model: {summary['final']}\ncheckpoint:  {summary['checkpoint']}\n"
          f"metrics:     {summary['metrics']} (tensorboard --logdir {Path(out) / 'tensorboard'})")
    return summary


# --------------------------------------------------------------------------- the pieces


class PretrainBatches:
    """The `BatchSource` of pretraining: a `SplitLoader` over the training documents per stage
    (packing at the stage's length happens on the fly from the same shards)."""

    def __init__(self, data: Path, recipe: Recipe):
        self.data, self.recipe, self.loader = Path(data), recipe, None

    def start(self, stage: int, spec: Stage, micro: int, info: DistInfo,
              state: dict | None) -> Iterator[dict]:
        d = self.recipe.data
        if self.recipe.objective.kind == "transformer-xl":
            return self._stream(spec, micro, info, state)
        config = LoaderConfig(seq_len=spec.seq_len, batch_size=micro, seed=d.seed,
                              cross_document_attention=d.cross_document_attention,
                              rank=info.rank, world_size=info.world_size,
                              pair_task=d.pair_task,
                              pair_fraction=micro_pair_fraction(d, spec, micro),
                              click_files=tuple(d.click_files), click=d.click_settings(),
                              masking=d.masking_config(), **auxiliary_batches(self.data,
                                                                              self.recipe))
        self.loader = SplitLoader(self.data, config, self.recipe.eval.holdout_every,
                                  held_out=False)
        if state is not None:
            self.loader.load_state_dict(state)
        if self.recipe.objective.kind in ("causal", "xlnet", "elmo"):  # rows read whole
            return causal_batches(self.loader)
        if self.recipe.objective.kind == "mass":
            return mass_batches(self.loader)
        return iter(self.loader)

    def _stream(self, spec: Stage, micro: int, info: DistInfo, state: dict | None
                ) -> Iterator[dict]:
        """Transformer-XL: each part's segments in order, one part per row (data/stream.py)."""
        check_xl_recipe(self.recipe, info.world_size)
        tokens, _ = document_stream(self.data, self.recipe.eval.holdout_every, held_out=False)
        self.loader = StreamLoader(tokens, spec.seq_len, spec.global_batch, micro)
        if state is not None:
            self.loader.load_state_dict(state)
        return iter(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader is not None else {}


def micro_pair_fraction(data: DataSpec, stage: Stage, micro: int) -> float:
    """The loader's pair fraction for one micro-batch, such that a step holds exactly
    round(global_batch * pair_fraction) pair rows however the global batch is split into
    micro-batches and processes (a run setting must not change what is trained)."""
    if data.pair_task == "none" or data.pair_fraction >= 1.0:
        return data.pair_fraction
    parts = stage.global_batch // micro  # micro-batches per step, over all processes
    pairs = min(max(round(stage.global_batch * data.pair_fraction), 1),
                stage.global_batch - 1)
    if pairs % parts or pairs // parts >= micro:
        raise UserError(f"stage {stage.name or stage.seq_len}: {pairs} pair rows per step "
                        f"(pair_fraction {data.pair_fraction} of {stage.global_batch}) do not "
                        f"split evenly over {parts} micro-batches of {micro} rows with room for "
                        "corpus rows; choose a --micro-batch (or process count) that makes "
                        f"global_batch / micro-batch divide {pairs}")
    return pairs // parts / micro


def eval_batches(data: Path, spec: EvalSpec, causal: bool,
                 cross_document_attention: bool = True
                 ) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The common evaluation set: `spec.rows` packed rows of held-out documents with BERT token
    masking at 15% (80/10/10), a fixed seed, the same for every recipe. Also returns the
    vocabulary size of the data. A causal recipe reads the same rows unmasked, packed as it
    trains (documents kept apart or not: `cross_document_attention`)."""
    config = LoaderConfig(seq_len=spec.seq_len, batch_size=spec.batch, seed=spec.seed,
                          cross_document_attention=cross_document_attention or not causal,
                          masking=MaskingConfig(strategy="token", rate=0.15))
    loader = SplitLoader(data, config, spec.holdout_every, held_out=True)
    n = min(max(spec.rows // spec.batch, 1), loader.steps_per_epoch)
    batches = iter(loader) if not causal else causal_batches(loader)
    return [next(batches) for _ in range(n)], len(loader.vocab)


def pair_eval_batches(data: Path, recipe: Recipe) -> list[dict[str, torch.Tensor]]:
    """The held-out pair examples of the recipe's pair task, masked like the MLM evaluation
    (BERT token masking at 15%, fixed seed): sentence order or next sentence from the held-out
    documents, click pairs from `click_eval_files` (none given: no pair evaluation). Up to
    `eval.rows` rows, at least 1,024 when there are that many (pair rows are short and only go
    forward; over 256 rows one accuracy has a standard error of 3 points, over 1,024 of 1.6)."""
    d, spec = recipe.data, recipe.eval
    if d.pair_task == "none" or (d.pair_task == "click" and not d.click_eval_files):
        return []
    config = LoaderConfig(seq_len=spec.seq_len, batch_size=1, seed=spec.seed,
                          pair_task=d.pair_task, click_files=tuple(d.click_eval_files),
                          click=d.click_settings(),
                          masking=MaskingConfig(strategy="token", rate=0.15))
    try:
        available = SplitLoader(data, config, spec.holdout_every, held_out=True).steps_per_epoch
    except UserError as e:  # e.g. no held-out document with two sentences: say so, go on
        print(f"motian: no held-out pair evaluation: {e}", file=sys.stderr)
        return []
    batch = min(spec.batch, available)
    loader = SplitLoader(data, replace(config, batch_size=batch), spec.holdout_every,
                         held_out=True)
    n = min(max(max(spec.rows, 1024) // batch, 1), loader.steps_per_epoch)
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def fit_config(recipe: Recipe) -> FitConfig:
    """The recipe's loop settings: its stages on the "stages" schedule, its checkpoints."""
    return FitConfig(optim=recipe.optim, stages=recipe.stages, steps=recipe.steps,
                     budget_minutes=recipe.budget_minutes, budget_clock=recipe.budget_clock,
                     schedule="stages", seed=recipe.seed,
                     eval_every=recipe.eval.every, checkpoint_every=recipe.checkpoint_every,
                     keep_last=recipe.keep_last, max_bad_steps=recipe.max_bad_steps,
                     log_every=LOG_EVERY, label=f"pretrain {recipe.name}",
                     fingerprint=recipe.fingerprint())


def build_objective(recipe: Recipe, data: Path, run: RunSettings, meta: bool = False
                    ) -> Pretrainer | ReplacedTokens | MaskedSeq2Seq:
    """The model the recipe describes (the same initial weights on every rank and every run)
    inside its objective, with the common evaluation set. `meta`: the model is built on the
    meta device and gets its memory and those same weights after sharding
    (`motian.train.meta_init`; `fit` materialises it)."""
    check_xl_recipe(recipe)
    if recipe.objective.kind == "transformer-xl":  # its own model, batches and eval: train/xl.py
        return build_xl_objective(recipe, data, run.checkpoint_activations)
    if recipe.objective.kind == "elmo":  # a biLSTM LM on the causal LM's rows: train/elmo.py
        return build_elmo_objective(recipe, *eval_batches(data, recipe.eval, causal=True))
    causal = recipe.objective.kind == "causal"
    xlnet = recipe.objective.kind == "xlnet"
    evalset, vocab_size = eval_batches(data, recipe.eval, causal or xlnet,
                                       recipe.data.cross_document_attention)
    torch.manual_seed(recipe.seed)
    config = recipe.model.build(vocab_size).replace(
        checkpoint_activations=run.checkpoint_activations)
    config = document_attention(recipe, config)
    if not causal and config.causal:
        raise UserError(f"recipe {recipe.name}: a causal model needs objective.kind: causal")
    if continual(recipe):  # ERNIE 2.0's stages of tasks: motian.train.continual
        return build_continual_objective(recipe, data, config, evalset)
    with deferred(meta) as built:  # meta: no memory until fit has sharded it
        built.append(model := build_model(config, recipe.objective, recipe.data.pair_task))
    if recipe.objective.kind == "mass":  # an encoder-decoder with its own held-out rows
        if not recipe.data.cross_document_attention:
            raise UserError(f"recipe {recipe.name}: objective.kind mass reads packed rows "
                            "whole; set data.cross_document_attention: true")
        return MaskedSeq2Seq(model, mass_eval_batches(data, recipe.eval,
                                                      recipe.objective.mass_span))
    if xlnet:  # permutation LM on the rows read whole, own held-out orders: train/xlnet.py
        k = recipe.objective.xlnet_k
        return PermutationLM(model, k, xlnet_eval_batches(evalset, k, recipe.eval.seed))
    if recipe.objective.kind in REPLACED_KINDS:  # ELECTRA / MC-BERT: + generator, own eval
        return ReplacedTokens(model, recipe.objective, evalset)
    weighting = TaskWeighting(task_names(recipe.objective, recipe.data.pair_task),
                              recipe.objective)
    pairs = [] if causal else pair_eval_batches(data, recipe)
    o = recipe.objective
    if o.sbo:  # SpanBERT's span boundary objective: motian.train.sbo
        return SpanBoundaryPretrainer(model, weighting, evalset, pairs, o.sbo_max_span)
    if o.notes:  # Taking Notes on the Fly: motian.train.notes
        return NotesPretrainer(model, weighting, evalset, pairs, rare_words_for(data, recipe), o)
    if o.kind == "unilm":  # per-row attention masks: motian.train.unilm
        return UnifiedPretrainer(model, weighting, evalset, pairs)
    return Pretrainer(model, weighting, evalset, pairs)


def auxiliary_batches(data: Path, recipe: Recipe) -> dict:
    """What the loader adds to each batch for SBO (span boundaries), notes (rare words), UNILM
    (row modes) or MASS (masked fragments)."""
    o = recipe.objective
    return {"span_boundaries": o.sbo,
            "rare_words": rare_words_for(data, recipe) if o.notes else None,
            "unilm_modes": unilm_mode_shares(o) if o.kind == "unilm" else None,
            "mass_span": o.mass_span if o.kind == "mass" else 0.0}


# --------------------------------------------------------------------------- the run


def document_attention(recipe: Recipe, config: ModelConfig) -> ModelConfig:
    """The model's `cross_document_attention` follows the recipe's data section: the loader
    keeping documents apart (restarting positions) while the model ignored the document ids
    would silently train on attention across documents. Both set and differing is an error."""
    wanted = recipe.data.cross_document_attention
    if "cross_document_attention" in recipe.model.overrides and \
            config.cross_document_attention != wanted:
        raise UserError(f"recipe {recipe.name}: model cross_document_attention is "
                        f"{config.cross_document_attention} but data.cross_document_attention is "
                        f"{wanted}; set it in the data section only (the model follows it)")
    return config.replace(cross_document_attention=wanted)


def pretrain_recipe(recipe: Recipe, run: RunSettings, data: Path, run_dir: Path,
                    resume: bool = False, init_from: Path | None = None,
                    allow_vocab_mismatch: bool = False) -> dict:
    """Pretrain `recipe` on the encoded shards in `data`, writing checkpoints, metrics and the
    final model under `run_dir`. Runs alone or as one rank of torchrun. Returns a summary."""
    with dist_utils.process_group(run.device, run.dist_timeout_s) as info, \
            hold_run_dir(Path(run_dir), enabled=info.is_main):
        return _pretrain(recipe, run, Path(data), Path(run_dir), info, resume, init_from,
                         allow_vocab_mismatch)


def _pretrain(recipe: Recipe, run: RunSettings, data: Path, run_dir: Path, info: DistInfo,
              resume: bool, init_from: Path | None, allow_vocab_mismatch: bool) -> dict:
    if run.threads:
        torch.set_num_threads(run.threads)
    precision = resolve_precision(run.precision, info.device)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints ({existing.name}); pass --resume "
                        "to continue that run, or choose another --out")
    # --parallel fsdp: the model is built on meta and each rank materialises only its shards
    # (not with --init-from, which loads whole weights into the model as built)
    meta = run.parallel == "fsdp" and info.distributed and (existing is not None
                                                           or init_from is None)
    objective = build_objective(recipe, data, run, meta=meta)
    data_hash = EncodedDataset(data).manifest.get("vocab_hash")
    objective.model.vocab_hash = data_hash  # saved with every checkpoint and final/
    if existing is None and init_from is not None:
        check_vocab(model_vocab_hash(resolve_model_dir(Path(init_from))), data_hash,
                    f"--init-from {init_from}", f"the shards in {data}", allow_vocab_mismatch)
        init_weights_from(objective.model, Path(init_from), verbose=info.is_main)
    # The run's files (recipe.yaml, run.json, the tokenizer copy) are written only once `fit`
    # has validated a resume: a refused --resume leaves the run as it was.
    open_logger = (lambda: _start_logging(recipe, run, run_dir, info, precision, data)) \
        if info.is_main else None
    source = ContinualBatches(data, recipe) if continual(recipe) else PretrainBatches(data,
                                                                                       recipe)
    summary = fit(objective, source, fit_config(recipe), run, run_dir,
                  info, resume=resume, open_logger=open_logger, fsdp_ok=True)
    return _finish(run_dir, objective, summary, info)


def _start_logging(recipe: Recipe, run: RunSettings, run_dir: Path, info: DistInfo,
                   precision: str, data: Path) -> MetricsLogger:
    from motian.data.tokenizer import encoded_tokenizer
    from motian.io import write_json_atomic
    from motian.train.recipe import save_recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    meta = run_metadata(to_dict(recipe), to_dict(run), info.world_size,
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


def _finish(run_dir: Path, objective: Pretrainer, summary: dict, info: DistInfo) -> dict:
    from motian.io import write_json_atomic
    from motian.model.io import save_pretrained

    summary = {k: v for k, v in summary.items() if k not in ("last", "skipped_steps")}
    summary.update({"final": str(run_dir / "final"), "metrics": str(run_dir / "metrics.jsonl")})
    whole = dist_utils.full_model_state(objective.model)  # --parallel fsdp: every rank gathers
    if info.is_main:
        save_pretrained(objective.model, run_dir / "final", whole)
        for name in ("tokenizer.json", "vocab.txt"):  # the copy _start_logging made
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, run_dir / "final" / name)
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- inspect-batch


def inspect_batch(data: Path, recipe: str | None = None, tokenizer: Path | None = None,
                  preset: Literal["bert", "wwm", "spanbert", "motian"] | None = None,
                  strategy: Literal["token", "whole_word", "ngram", "span"] | None = None,
                  seq_len: int | None = None, examples: int = 4, seed: int | None = None,
                  pair_task: Literal["none", "sop", "nsp", "click"] | None = None,
                  click_files: list[Path] | None = None) -> list[str]:
    """Print a few masked training examples as text, to see what the model must predict.

    Args:
        data: a directory written by `motian encode`.
        recipe: show what this pretraining recipe (a name such as demo, or a YAML file) trains
            on: the first rows of its first step, with its masking, pair task, length and seed
            (the options below then stay unset).
        tokenizer: the tokenizer the data was encoded with (default: data/vocab.txt).
        preset: masking recipe: bert (tokens), wwm (whole words), spanbert (spans), motian
            (words and phrases, synonyms instead of [MASK]; the default without --recipe).
        strategy: override the preset's unit: token, whole_word, ngram or span.
        seq_len: sequence length of the packed rows (default 128).
        examples: how many rows to print.
        seed: the loader seed (default 0; the same seed shows the same masks as training).
        pair_task: none (packed documents, the default), sop (sentence-order pairs), nsp (next
            sentence) or click (pairs from click_files).
        click_files: click logs (query<TAB>title<TAB>label) for pair_task=click.
    """
    if recipe is not None:
        given = [name for name, value in (("tokenizer", tokenizer), ("preset", preset),
                                          ("strategy", strategy), ("seq_len", seq_len),
                                          ("seed", seed), ("pair_task", pair_task),
                                          ("click_files", click_files)) if value is not None]
        if given:
            raise UserError(f"--recipe {recipe} decides {', '.join(given)}: give either the "
                            "recipe or those options (inspect-batch --help)")
        loader, header = _recipe_loader(Path(data), recipe)
    else:
        loader, header = options_loader(Path(data), tokenizer, preset, strategy, seq_len,
                                        examples, seed, pair_task, click_files)
    return show_batch(loader, header, examples)


def _recipe_loader(data: Path, name: str):
    """The loader of `name`'s first training step, built by pretraining's own batch source
    (one process, the stage's whole global batch), and a header saying what it is."""
    from motian.train.recipe import load_recipe

    recipe = load_recipe(name)
    if recipe.objective.kind in ("causal", "elmo"):
        raise UserError(f"recipe {recipe.name} trains a decoder on next tokens: nothing is "
                        "masked, so there is nothing for inspect-batch to show")
    if recipe.objective.kind == "xlnet":
        raise UserError(f"recipe {recipe.name} trains XLNet's permutation LM on rows read "
                        "whole (its orders are drawn in the objective): nothing is masked, so "
                        "there is nothing for inspect-batch to show")
    stage = recipe.stages[0]
    source = PretrainBatches(data, recipe)
    source.start(0, stage, stage.global_batch, DistInfo(), None)
    d, masking = recipe.data, recipe.data.masking_config()
    header = (f"{data}: recipe {recipe.name}, its first step (training documents): masking "
              f"{d.masking}, strategy {masking.strategy}, rate {masking.rate:g}, pair task "
              f"{d.pair_task}, L={stage.seq_len}, seed {d.seed}")
    return source.loader, header
