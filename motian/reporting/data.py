"""The data-preparation page: what `motian prepare` (clean → vocabulary → encode) did, built
from the report dict `prepare` returns and writes to report.json.

The cleaning section is still `motian.data.clean.format_report`: `clean` writes its own
report.md from inside the data layer, which may not import this one.
"""

from __future__ import annotations


def prepare_page(report: dict, title: str = "# Data preparation report") -> str:
    """The Markdown of `prepare`'s report.md; `title` is the heading before ": <out>" (the demo
    report makes it a section: "## Data preparation")."""
    from motian.data.clean import format_report

    secs, out = report["seconds"], report["out"]
    tok, enc = report["tokenizer"]["counts"], report["encode"]["counts"]
    syn = report["encode"].get("synonym_table", {})
    lines = [f"{title}: {out}", "",
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
