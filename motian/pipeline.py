"""The whole job in one call: `prepare` (clean → vocabulary → encode, with one report) and
`demo` (prepare → pretrain → fine-tune → distil → export, with one report).

`prepare` chains the data stages on any inputs; `demo` runs everything on the bundled corpus
(People's Daily 1998 + product reviews) and is what `make demo` calls. The bundled tasks'
dev/test texts are kept out of the corpus (`exclude_heldout`), so the downstream scores the
demo prints measure a model that never read them. Every stage resumes where it stopped, so
re-running after an interruption (or to add a later stage) redoes nothing finished.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from motian.data.shards import write_json_atomic
from motian.errors import UserError
from motian.train.settings import OptimSettings, RunSettings


def prepare(inputs: list[str], out: Path, vocab_size: int = 8000, workers: int = 0,
            txt_mode: Literal["line", "blank"] = "line", text_field: str = "text",
            user_dict: Path | None = None, from_vocab: Path | None = None,
            exclude_heldout: bool = True, resume: bool = True, progress: bool = True) -> dict:
    """Clean the inputs, train a vocabulary on the cleaned text and encode it into shards.

    Writes ``out/clean`` (cleaned shards + report), ``out/tokenizer`` (vocab.txt,
    tokenizer.json), ``out/encoded`` (memory-mapped shards + manifest) and ``out/report.md``.

    Args:
        inputs: built-in corpora (pd98, reviews) and/or files, directories, globs.
        out: output directory.
        vocab_size: WordPiece vocabulary size (ignored with from_vocab).
        workers: processes for clean and encode; 0 uses every core.
        txt_mode: for .txt inputs: "line" (a document per line) or "blank" (blank-line separated).
        text_field: for .jsonl inputs: the field holding the text.
        user_dict: a jieba user dictionary for word segmentation.
        from_vocab: an existing BERT vocab.txt to use instead of training one.
        exclude_heldout: drop documents holding a dev/test example of the bundled tasks
            (reviews-sentiment, pd98-ner, pd98-seg) from the corpus; counted in the report.
        resume: continue an interrupted run in the same out directory.
        progress: show progress bars.
    """
    from motian.data.clean import clean
    from motian.data.encode import encode
    from motian.data.tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    print(f"[1/3] clean {' '.join(map(str, inputs))} -> {out / 'clean'}", flush=True)
    clean_report = clean(inputs, out / "clean", txt_mode=txt_mode, text_field=text_field,
                         workers=workers, exclude_heldout=exclude_heldout, resume=resume,
                         progress=progress)
    timings["clean"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[2/3] vocabulary -> {out / 'tokenizer'}", flush=True)
    tok_report = train_tokenizer([str(out / "clean")], out / "tokenizer",
                                 vocab_size=vocab_size, from_vocab=from_vocab)
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[3/3] encode -> {out / 'encoded'}", flush=True)
    enc_report = encode([str(out / "clean")], out / "encoded", tokenizer=out / "tokenizer",
                        user_dict=user_dict, workers=workers, resume=resume, progress=progress)
    timings["encode"] = time.perf_counter() - t0

    report = {"inputs": [str(i) for i in inputs], "out": str(out), "seconds": timings,
              "clean": clean_report, "tokenizer": tok_report, "encode": enc_report}
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    print(f"report: {out / 'report.md'}", flush=True)
    return report


def _markdown(report: dict) -> str:
    from motian.data.clean import format_report

    secs, out = report["seconds"], report["out"]
    tok, enc = report["tokenizer"]["counts"], report["encode"]["counts"]
    syn = report["encode"].get("synonym_table", {})
    lines = [f"# Data preparation report: {out}", "",
             f"Inputs: {', '.join(report['inputs'])}", "",
             "| stage | seconds | output |", "|---|---:|---|",
             f"| clean | {secs['clean']:.1f} | {out}/clean |",
             f"| tokenizer | {secs['tokenizer']:.1f} | {out}/tokenizer |",
             f"| encode | {secs['encode']:.1f} | {out}/encoded |", "",
             format_report(report["clean"]), "",
             "## Vocabulary", "",
             f"{tok['vocab_size']:,} tokens; {tok.get('alphabet', 0):,} of the "
             f"{tok.get('distinct_chars', 0):,} distinct characters of the training text are in "
             f"the vocabulary; [UNK] {tok['unk_tokens']:,} of "
             f"{tok['tokens']:,} tokens ({100 * tok['unk_rate']:.3f}%).", "",
             "## Encoded shards", "",
             f"{enc['docs']:,} documents, {enc['tokens']:,} tokens, "
             f"{len(report['encode']['shards'])} shards; word starts "
             f"{100 * enc['word_starts'] / max(enc['tokens'], 1):.1f}% of tokens; "
             f"{enc['synonym_words']:,} words with a same-length Cilin synonym "
             f"({syn.get('rows', 0):,} synonym rows, {syn.get('candidates', 0):,} candidates).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the demo

DEMO_TASKS = ("reviews-sentiment", "pd98-ner")
FULL_BUDGET = 20.0  # minutes at which the demo fine-tunes on FULL_TRAIN examples, full dev/test
FULL_TRAIN = 6000
# Fine-tuning settings of the demo (and of benchmarks/downstream.py): one epoch, batch 32,
# lr 1e-3 (a 4-layer, 128-wide model; docs/finetune.md).
# The demo's fine-tuning (and distillation) settings: one epoch at batch 32, AdamW at 1e-3 (a
# tiny model needs a far higher rate than BERT-base's 5e-5).
FINETUNE_EPOCHS, FINETUNE_BATCH, FINETUNE_OPTIM = 1.0, 32, OptimSettings(lr=1e-3)
# The demo recipe pretrains with MLM only, which never trains [CLS]: its classifiers read the
# mean of the tokens instead (+2.2 points on reviews-sentiment, 3 seeds; docs/finetune.md).
DEMO_POOLING = "mean"


def demo(out: Path = Path("runs/demo"), budget: float = FULL_BUDGET, workers: int = 0,
         resume: bool = True, recipe: str = "demo", inputs: list[str] | None = None,
         seeds: list[int] | None = None, control: bool = True, distill: bool = True,
         progress: bool = True) -> dict:
    """Run the whole job on the bundled corpus: clean (without the bundled tasks' dev/test
    texts) → vocabulary → encode → pretrain the `demo` recipe → fine-tune reviews-sentiment and
    pd98-ner (pretrained, and from random initialisation as the control) → distil the
    reviews model into a half-depth student → export it to ONNX; writes out/report.md.

    Args:
        out: output directory (data in out/clean, out/tokenizer, out/encoded; pretraining in
            out/pretrain; fine-tuning in out/finetune-*; out/distill, out/export, out/report.md).
        budget: minutes for the whole demo on 2 CPU cores; pretraining gets half, fine-tuning
            uses 6,000 training examples per task at 20 minutes and proportionally fewer below.
        workers: processes for the data stages; 0 uses every core.
        resume: continue an interrupted demo in the same out directory.
        recipe: the pretraining recipe (a name in configs/ or a YAML file).
        inputs: the corpus (default: the bundled pd98 and reviews).
        seeds: fine-tuning seeds (default: 1).
        control: also fine-tune from random initialisation (same shape, tokenizer, settings).
        distill: distil the fine-tuned reviews model and export the student.
        progress: show progress bars.
    """
    from motian.pretraining import pretrain

    out = Path(out)
    if budget <= 0:
        raise UserError(f"--budget must be positive (got {budget})")
    report = prepare(list(inputs or ["pd98", "reviews"]), out, workers=workers, resume=resume,
                     progress=progress)
    run = out / "pretrain"
    print(f"[pretrain] {recipe} for {budget / 2:g} minutes -> {run}", flush=True)
    report["pretrain"] = pretrain(recipe=recipe, data=out / "encoded", out=run, resume=resume,
                                  budget_minutes=budget / 2, run=RunSettings(progress=progress))
    arms = _finetune_all(out, run / "final", budget, seeds or [1], control, progress)
    if distill:
        arms["distill"] = _distill_and_export(out, arms, budget, seeds or [1], progress)
    report["report"] = str(_demo_report(out, run, arms, report))
    return report


def finetune_sizes(budget: float) -> tuple[int, int | None]:
    """(training examples per task, dev/test examples or None for all) for a demo `budget`."""
    scale = min(1.0, budget / FULL_BUDGET)
    if scale >= 1.0:
        return FULL_TRAIN, None
    return max(64, round(FULL_TRAIN * scale)), max(64, round(2000 * scale))


def _finetune_all(out: Path, model: Path, budget: float, seeds: list[int], control: bool,
                  progress: bool) -> dict[str, Path]:
    """Fine-tune every demo task from `model` (and from random init); {arm/task: run dir}."""
    from motian.finetuning import finetune
    from motian.task_training import TaskTraining

    max_train, max_eval = finetune_sizes(budget)
    arms: dict[str, Path] = {}
    for task in DEMO_TASKS:
        for arm, random_init in [("pretrained", False)] + [("random init", True)] * control:
            directory = out / (f"finetune-{task}" + ("-random-init" if random_init else ""))
            print(f"[fine-tune] {task} ({arm}, {max_train} examples) -> {directory}",
                  flush=True)
            finetune(task, directory, model=model, seeds=seeds, max_train=max_train,
                     max_eval=max_eval, random_init=random_init, save_model=not random_init,
                     pooling=DEMO_POOLING, optim=FINETUNE_OPTIM,
                     training=TaskTraining(epochs=FINETUNE_EPOCHS, batch_size=FINETUNE_BATCH),
                     run=RunSettings(progress=progress))
            arms[f"{arm}/{task}"] = directory
    return arms


def _distill_and_export(out: Path, arms: dict[str, Path], budget: float, seeds: list[int],
                        progress: bool) -> Path:
    """Distil the pretrained reviews-sentiment model (first seed) into a student with half
    its layers, beside the same student trained without a teacher; export the student."""
    from motian.distillation import distill
    from motian.serving.export import export

    max_train, max_eval = finetune_sizes(budget)
    teacher = arms["pretrained/reviews-sentiment"] / f"seed-{seeds[0]}" / "model"
    print(f"[distil] {teacher} -> {out / 'distill'}", flush=True)
    distill(teacher, out / "distill", seeds=seeds, max_train=max_train, max_eval=max_eval,
            epochs=FINETUNE_EPOCHS, batch_size=FINETUNE_BATCH, optim=FINETUNE_OPTIM,
            run=RunSettings(progress=progress))
    student = out / "distill" / f"seed-{seeds[0]}" / "model"
    print(f"[export] {student} -> {out / 'export'}", flush=True)
    try:
        export(student, out / "export", format="onnx")
    except ImportError as err:  # onnx/onnxruntime are the optional `onnx` extra
        print(f"export skipped: {err}; pip install 'motian[onnx]' to export", flush=True)
    return out / "distill"


def _demo_report(out: Path, run: Path, arms: dict[str, Path], data_report: dict) -> Path:
    """out/report.md: the pretraining run's report (plots, tables) with the downstream arms,
    then the data-preparation report; prints the downstream table."""
    from motian.reporting.run import downstream_table, read_downstream, write_report

    path = write_report(run, out, arms)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + "\n" + _markdown(data_report).replace("# Data preparation report",
                                                                 "## Data preparation", 1),
                    encoding="utf-8")
    print("\n".join(downstream_table(read_downstream(arms))), flush=True)
    print(f"report: {path}", flush=True)
    return path
