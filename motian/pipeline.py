"""The whole data job in one call: clean → vocabulary → encode, with one report.

`prepare` chains the three stages on any inputs; `demo` runs it on the bundled corpus (People's
Daily 1998 + product reviews) and is what `make demo` calls. Every stage resumes where it
stopped, so re-running after an interruption (or to add a later stage) redoes nothing finished.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from motian.data.shards import write_json_atomic


def prepare(inputs: list[str], out: Path, vocab_size: int = 8000, workers: int = 0,
            txt_mode: Literal["line", "blank"] = "line", text_field: str = "text",
            user_dict: Path | None = None, from_vocab: Path | None = None,
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
                         workers=workers, resume=resume, progress=progress)
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


def demo(out: Path = Path("runs/demo"), workers: int = 0, resume: bool = True,
         budget_minutes: float = 10.0, recipe: str = "demo", progress: bool = True) -> dict:
    """Run the whole job on the bundled corpus (People's Daily 1998 + product reviews): clean →
    vocabulary → encode, then pretrain the `demo` recipe for `budget_minutes`.

    Args:
        out: output directory (data in out/clean, out/tokenizer, out/encoded; the run in
            out/pretrain).
        workers: processes for the data stages; 0 uses every core.
        resume: continue an interrupted run in the same out directory (data and pretraining).
        budget_minutes: pretraining time; the learning-rate schedule follows it.
        recipe: the pretraining recipe (a name in configs/ or a YAML file).
        progress: show progress bars.
    """
    from motian.pretrain import pretrain

    out = Path(out)
    report = prepare(["pd98", "reviews"], out, workers=workers, resume=resume, progress=progress)
    run = out / "pretrain"
    print(f"[4/4] pretrain {recipe} for {budget_minutes:g} minutes -> {run}", flush=True)
    report["pretrain"] = pretrain(recipe=recipe, data=out / "encoded", out=run,
                                  resume=resume, budget_minutes=budget_minutes,
                                  progress=progress)
    return report
