"""The data-preparation page: what `motian prepare` (clean → vocabulary → encode) did, built
from the report dict `prepare` returns and writes to report.json.

Also the cleaning pages: `clean_page` (the `clean` verb's report.md: summary and examples) and
`clean_summary` (its table, which `clean` prints and `prepare_page` embeds), built from the
report dict `motian.data.clean.clean_corpus` returns.
"""

from __future__ import annotations

import json

from motian.data.clean import HELDOUT, REASONS


def clean_page(rep: dict) -> str:
    """The `clean` verb's report.md."""
    return clean_summary(rep) + "\n" + clean_examples(rep)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def clean_summary(rep: dict) -> str:
    """The cleaning report's table and totals as Markdown (also what `clean` prints)."""
    d, c = rep["documents"], rep["characters"]
    lines = [f"# motian clean: {', '.join(map(str, rep['inputs']))} -> {rep['out']}", "",
             "| | documents | % | characters | % |", "|---|---:|---:|---:|---:|",
             f"| read | {d['read']:,} | | {c['read']:,} | |",
             f"| kept | {d['kept']:,} | {_pct(d['kept'], d['read'])} | {c['kept']:,} | "
             f"{_pct(c['kept'], c['read'])} |",
             f"| removed by normalisation | | | {c['removed_by_normalisation']:,} | "
             f"{_pct(c['removed_by_normalisation'], c['read'])} |"]
    for reason in REASONS:
        if reason in d["dropped"]:
            n, ch = d["dropped"][reason], c["dropped"][reason]
            lines.append(f"| dropped: {reason} | {n:,} | {_pct(n, d['read'])} | {ch:,} | "
                         f"{_pct(ch, c['read'])} |")
    if rep["settings"].get("exclude_heldout"):
        lines += ["", f"held-out task texts removed: {d['dropped'].get(HELDOUT, 0):,} "
                  f"documents, {c['dropped'].get(HELDOUT, 0):,} characters (dev/test of the "
                  "bundled tasks; --no-exclude-heldout keeps them)"]
    if "excluded" in rep:
        ex = rep["excluded"]
        files = ", ".join(f"{f} ({n:,})" for f, n in ex["files"].items())
        lines += ["", f"--exclude: {ex['texts']:,} distinct texts read from {files}; "
                  f"{ex['documents_removed']:,} documents holding one removed "
                  f"({ex['characters_removed']:,} characters)"]
    tp = rep["throughput"]
    lines += ["", f"{rep['shards']} shard(s); {tp['seconds']} s, {tp['docs_per_s']:,} docs/s, "
              f"{tp['input_mb_per_s']} MB/s of input text. LSH: {rep['lsh']['bands']} bands × "
              f"{rep['lsh']['rows']} rows."]
    skipped = rep["skipped_input"]["counts"]
    if skipped:
        lines += ["", "Skipped input: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines)


def clean_examples(rep: dict) -> str:
    """The examples of every drop reason and skipped input, as Markdown."""
    lines = ["", "## Examples", ""]
    for reason, exs in rep["examples"].items():
        lines.append(f"**{reason}** ({REASONS[reason]})")
        lines += [f"- `{e['where']}` {e['detail']}: {json.dumps(e['text'], ensure_ascii=False)}"
                  for e in exs]
        lines.append("")
    for reason, exs in rep["skipped_input"]["examples"].items():
        lines.append(f"**skipped input: {reason}**")
        lines += [f"- {e}" for e in exs]
        lines.append("")
    return "\n".join(lines)



def prepare_page(report: dict, title: str = "# Data preparation report") -> str:
    """The Markdown of `prepare`'s report.md; `title` is the heading before ": <out>" (the demo
    report makes it a section: "## Data preparation")."""
    secs, out = report["seconds"], report["out"]
    tok, enc = report["tokenizer"]["counts"], report["encode"]["counts"]
    syn = report["encode"].get("synonym_table", {})
    lines = [f"{title}: {out}", "",
             f"Inputs: {', '.join(report['inputs'])}", "",
             "| stage | seconds | output |", "|---|---:|---|",
             f"| clean | {secs['clean']:.1f} | {out}/clean |",
             f"| tokenizer | {secs['tokenizer']:.1f} | {out}/tokenizer |",
             f"| encode | {secs['encode']:.1f} | {out}/encoded |", "",
             clean_summary(report["clean"]), "",
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
