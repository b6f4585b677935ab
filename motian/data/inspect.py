"""`motian inspect-batch`: print masked training examples as text.

Shows a user what the model is asked to predict, exactly as the loader makes it (same packing,
masking and seeds as training). Each masked word is written once, with what the model sees:

    [国家→■■]     replaced by [MASK] (one ■ per token)
    {国家⇒邦国}   replaced by a same-length Cilin synonym
    [国家→江苏]   replaced by a random word / random tokens
    [国家=]       kept as it is (the model still has to predict it)

Words chosen together as a phrase or span appear side by side. ``‖`` is [SEP].

With ``--recipe NAME`` the rows are the first rows of that recipe's first training step, made
by the pretraining loop's own batch source (its masking, pair task, sequence length, seed and
training documents), so what is shown is what the recipe trains on; that verb lives in
`motian.pretraining.inspect_batch` (the data layer does not know recipes), this module builds
the option-made loader and prints rows.
"""

from __future__ import annotations

import itertools
from pathlib import Path

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


def options_loader(data: Path, tokenizer: Path | None = None,
                   preset: str | None = None, strategy: str | None = None,
                   seq_len: int | None = None, examples: int = 4, seed: int | None = None,
                   pair_task: str | None = None,
                   click_files: list[Path] | None = None) -> tuple[PackedLoader, str]:
    """The loader `inspect-batch` shows without a recipe (its options, their defaults), and a
    header saying what it is."""
    preset, seq_len, seed = preset or "motian", seq_len or 128, seed or 0
    masking = MaskingConfig.preset(preset, **({"strategy": strategy} if strategy else {}))
    config = LoaderConfig(seq_len=seq_len, batch_size=examples, seed=seed,
                          pair_task=pair_task or "none",
                          click_files=tuple(str(f) for f in click_files or ()),
                          masking=masking)
    loader = PackedLoader(data, tokenizer, config)
    return loader, f"{data}: preset {preset}, strategy {masking.strategy}, L={seq_len}, seed {seed}"


def show_batch(loader: PackedLoader, header: str, examples: int) -> list[str]:
    """Print the first `examples` rows of the loader's next batch as text (see the module
    docstring) and return them."""
    arrays, masked = next(itertools.islice(loader.iter_numpy(), 1))
    print(header)
    print(LEGEND)
    lines = []
    for r in range(min(examples, len(masked.input_ids))):
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
