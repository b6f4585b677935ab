"""`motian inspect-batch`: print masked training examples as text.

Shows a user what the model is asked to predict, exactly as the loader makes it (same packing,
masking and seeds as training). Each masked word is written once, with what the model sees:

    [国家→■■]     replaced by [MASK] (one ■ per token)
    {国家⇒邦国}   replaced by a same-length Cilin synonym
    [国家→江苏]   replaced by a random word / random tokens
    [国家=]       kept as it is (the model still has to predict it)

Words chosen together as a phrase or span appear side by side. ``‖`` is [SEP].
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import numpy as np

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import ACTION_NAMES, KEEP, MASK, NONE, RANDOM, SYNONYM, MaskingConfig

LEGEND = "legend: [word→■■] [MASK]   {word⇒synonym}   [word→random] random   [word=] kept   ‖ [SEP]"


def render_row(vocab: list[str], original: np.ndarray, shown: np.ndarray, actions: np.ndarray,
               word_starts: np.ndarray, attention: np.ndarray, special: dict[str, int]) -> str:
    """One example as text with the masked words marked (see the module docstring)."""
    n = int(attention.sum())
    pieces: list[str] = []
    p = 0
    while p < n:
        tok = int(original[p])
        if tok == special["cls"]:
            p += 1
            continue
        if tok == special["sep"]:
            pieces.append(" ‖ ")
            p += 1
            continue
        q = p + 1  # the word is p..q-1: up to the next word start or non-word token
        while q < n and not word_starts[q] and original[q] not in (special["sep"],
                                                                    special["cls"]):
            q += 1
        word = _text(vocab, original[p:q])
        action = int(actions[p])
        if action == NONE:
            pieces.append(word)
        elif action == MASK:
            pieces.append(f"[{word}→{'■' * (q - p)}]")
        elif action == SYNONYM:
            pieces.append(f"{{{word}⇒{_text(vocab, shown[p:q])}}}")
        elif action == RANDOM:
            pieces.append(f"[{word}→{_text(vocab, shown[p:q])}]")
        elif action == KEEP:
            pieces.append(f"[{word}=]")
        p = q
    return "".join(pieces)


def _text(vocab: list[str], ids: np.ndarray) -> str:
    out = ""
    for i in ids.tolist():
        t = vocab[i]
        if t.startswith("##"):
            out += t[2:]
        elif out and out[-1].isascii() and out[-1].isalnum() and t[:1].isascii():
            out += " " + t
        else:
            out += t
    return out


def inspect_batch(data: Path, tokenizer: Path | None = None,
                  preset: Literal["bert", "wwm", "spanbert", "motian"] = "motian",
                  strategy: Literal["token", "whole_word", "ngram", "span"] | None = None,
                  seq_len: int = 128, examples: int = 4, seed: int = 0,
                  pair_task: Literal["none", "sop", "click"] = "none",
                  click_files: list[Path] | None = None) -> list[str]:
    """Print a few masked training examples as text, to see what the model must predict.

    Args:
        data: a directory written by `motian encode`.
        tokenizer: the tokenizer the data was encoded with (default: data/vocab.txt).
        preset: masking recipe: bert (tokens), wwm (whole words), spanbert (spans), motian
            (words and phrases, synonyms instead of [MASK]).
        strategy: override the preset's unit: token, whole_word, ngram or span.
        seq_len: sequence length of the packed rows.
        examples: how many rows to print.
        seed: the loader seed (the same seed shows the same masks as training).
        pair_task: none (packed documents), sop (sentence-order pairs) or click (pairs from
            click_files).
        click_files: click logs (query<TAB>title<TAB>label) for pair_task=click.
    """
    masking = MaskingConfig.preset(preset, **({"strategy": strategy} if strategy else {}))
    config = LoaderConfig(seq_len=seq_len, batch_size=examples, seed=seed, pair_task=pair_task,
                          click_files=tuple(str(f) for f in click_files or ()),
                          masking=masking)
    loader = PackedLoader(data, tokenizer, config)
    arrays, masked = next(itertools.islice(loader.iter_numpy(), 1))
    print(f"{data}: preset {preset}, strategy {masking.strategy}, L={seq_len}, seed {seed}")
    print(LEGEND)
    lines = []
    for r in range(len(masked.input_ids)):
        text = render_row(loader.vocab, arrays["tokens"][r], masked.input_ids[r],
                          masked.actions[r], masked.word_starts[r], arrays["attention_mask"][r],
                          loader.special)
        acts = masked.actions[r]
        content = int(((arrays["attention_mask"][r] > 0)
                       & ~np.isin(arrays["tokens"][r], list(loader.special.values()))).sum())
        counts = ", ".join(f"{name} {int((acts == code).sum())}"
                           for code, name in ACTION_NAMES.items() if (acts == code).any())
        label = (f", pair label {int(arrays['pair_labels'][r])}" if "pair_labels" in arrays
                 else "")
        print(f"\n#{r}: {int((acts != NONE).sum())} of {content} tokens masked ({counts}){label}")
        print(text)
        lines.append(text)
    return lines
