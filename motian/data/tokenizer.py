"""The vocabulary: `motian tokenizer` trains a BERT-style WordPiece vocabulary or adopts one.

A trained vocabulary is BERT's recipe (the `tokenizers` library does the work): the BERT
normaliser puts spaces around every CJK character, so each one is its own token, and the BERT
pre-tokeniser splits on whitespace and punctuation; WordPiece then learns sub-words for Latin
words and numbers. Special tokens [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0–4.

What motian adds is the [UNK] guard. The WordPiece trainer keeps at most `limit_alphabet`
characters (`tokenizers`' BertWordPieceTokenizer uses 1000), so a Chinese corpus with several
thousand distinct characters loses the rare ones and they all become [UNK]: 7.9% of the tokens
of the bundled corpus with the default. Here the characters are counted first in one streaming
pass and every character seen at least `char_min_count` times is forced into the alphabet
(`initial_alphabet`, with `limit_alphabet` equal to its size so rarer ones are dropped), and
the continuation form ``##c`` is added for every letter or digit, so a Latin word that was
never seen whole still splits into pieces instead of becoming one [UNK]. The [UNK] rate on the
training text is measured and written to the manifest.

An existing BERT ``vocab.txt`` (bert-base-chinese's 21,128 tokens, say) can be adopted instead,
to continue pretraining a public checkpoint: the tokenizer is built from it with the same
normaliser and pre-tokeniser that `transformers.BertTokenizerFast` uses, so ids agree.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from motian.data.shards import vocab_hash
from motian.data.sources import BUILTIN, iter_documents, resolve_inputs
from motian.errors import SkipLog, UserError
from motian.io import write_json_atomic

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                  "mask": "[MASK]"}
CONTINUATION = "##"
BATCH_DOCS = 1000  # documents per encode_batch call when measuring the [UNK] rate


def _is_cjk(ch: str) -> bool:
    """The code points BERT's normaliser isolates (its `_is_chinese_char` ranges)."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _can_continue_word(ch: str) -> bool:
    """True for characters that can appear inside a pre-token word (letters, digits, marks):
    not CJK (isolated by the normaliser), not punctuation or symbols (split off)."""
    return not _is_cjk(ch) and unicodedata.category(ch)[0] in "LNM"


def bert_tokenizer(model: WordPiece, lowercase: bool) -> Tokenizer:
    """Wrap a WordPiece model in BERT's pipeline, the one `BertTokenizerFast` builds."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)
    add_bert_template(tok)
    return tok


def add_bert_template(tok: Tokenizer) -> None:
    """[CLS] A [SEP] (B [SEP]) around encodings, as BERT does, when both tokens exist."""
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def read_vocab(vocab_file: Path) -> dict[str, int]:
    """Token → id of a BERT vocab.txt (one token per line, the line number is the id)."""
    if not vocab_file.is_file():
        raise UserError(f"{vocab_file}: no such vocabulary file; give a BERT vocab.txt")
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise UserError(f"{vocab_file}:{i + 1}: token {token!r} already on line "
                            f"{vocab[token] + 1}; a vocab.txt lists each token once")
        vocab[token] = i
    if "[UNK]" not in vocab:
        raise UserError(f"{vocab_file}: no [UNK] token; a BERT vocab.txt needs one (add a line "
                        "'[UNK]', and [PAD] [CLS] [SEP] [MASK] for pretraining)")
    return vocab


def tokenizer_from_vocab(vocab_file: Path, lowercase: bool | None = None) -> Tokenizer:
    """A BERT tokenizer for an existing vocab.txt; `lowercase=None` guesses from the vocabulary
    (a vocabulary without upper-case tokens, like bert-base-chinese's, was made lower-cased)."""
    vocab = read_vocab(Path(vocab_file))
    if lowercase is None:
        lowercase = not any(t != t.lower() for t in vocab if not t.startswith("["))
    return bert_tokenizer(WordPiece(vocab, unk_token="[UNK]",
                                    continuing_subword_prefix=CONTINUATION), lowercase)


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a tokenizer: a directory with tokenizer.json (preferred) or vocab.txt (a Hugging
    Face checkpoint's tokenizer_config.json says whether to lower-case), a tokenizer.json, or
    a BERT vocab.txt. A file that cannot be read as one is a `UserError` naming it."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _tokenizer_json(path / "tokenizer.json")
        if (path / "vocab.txt").is_file():
            return _vocab_txt(path / "vocab.txt", _hf_lowercase(path))
        raise UserError(f"{path}: no tokenizer.json or vocab.txt here; make one with "
                        "`motian tokenizer`")
    if not path.is_file():
        raise UserError(f"{path}: no such tokenizer; give the directory written by "
                        "`motian tokenizer`, a tokenizer.json or a BERT vocab.txt")
    if path.suffix == ".json":
        return _tokenizer_json(path)
    return _vocab_txt(path)


def _tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for bad JSON
        raise UserError(f"{path}: not a readable tokenizer.json ({str(err)[:200]}); the file "
                        "is damaged or not a tokenizer: make it again with `motian tokenizer` "
                        "or copy it from the model it belongs to") from None


def _vocab_txt(path: Path, lowercase: bool | None = None) -> Tokenizer:
    try:
        return tokenizer_from_vocab(path, lowercase)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); a vocab.txt is UTF-8 text, one "
                        "token per line: convert it (e.g. iconv -f GB18030 -t UTF-8)") from None


def _hf_lowercase(directory: Path) -> bool | None:
    """`do_lower_case` of a Hugging Face checkpoint directory's tokenizer_config.json, if any."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("do_lower_case")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{config}: not a readable JSON object ({err}); fix or remove it "
                        "(only its do_lower_case is read)") from None
    return value if isinstance(value, bool) else None


def special_token_ids(path_or_tokenizer: Path | str | Tokenizer) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} → id, looked up by name (adopted vocabularies keep
    their own ids)."""
    tok = (path_or_tokenizer if isinstance(path_or_tokenizer, Tokenizer)
           else load_tokenizer(path_or_tokenizer))
    ids = {}
    for key, token in SPECIAL_TOKENS.items():
        tid = tok.token_to_id(token)
        if tid is None:
            raise UserError(f"the vocabulary has no {token} token; pretraining needs all of "
                            f"{' '.join(SPECIAL_TOKENS.values())}")
        ids[key] = tid
    return ids


def vocab_tokens(tok: Tokenizer) -> list[str]:
    """The vocabulary in id order (what a vocab.txt lists)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UserError("the tokenizer's ids are not 0..n-1 without gaps; it cannot be written "
                        "as a BERT vocab.txt")
    return tokens


def decode_text(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Token ids -> text as written: BERT's WordPiece decoder joins tokens with spaces (it was
    made for English), so Chinese comes back as "今 天 天 气"; the spaces beside a CJK character
    (ideograph, CJK punctuation, full-width form) are dropped, those between Latin words and
    numbers kept. [PAD] [CLS] [SEP] [MASK] are left out (these vocabularies do not mark them
    special, so the decoder would print them); a leading "##" piece loses its "##"."""
    skip = {tok.token_to_id(SPECIAL_TOKENS[k]) for k in ("pad", "cls", "sep", "mask")}
    text = tok.decode([i for i in ids if i not in skip], skip_special_tokens=False)
    return _SPACE_BY_CJK.sub("", text.removeprefix(CONTINUATION))


# A CJK ideograph, CJK symbol / punctuation (U+3000-303F) or full-width form (U+FF00-FFEF).
_CJK_CLASS = ("[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
              "\U00020000-\U0002fa1f]")
_SPACE_BY_CJK = re.compile(f"(?<={_CJK_CLASS}) +| +(?={_CJK_CLASS})")


def encoded_tokenizer(data: Path) -> Path | None:
    """The tokenizer the shards in `data` were encoded with: the tokenizer.json their manifest
    names when it is still there with the same vocabulary, else the vocab.txt that `encode`
    copied beside the shards (the same vocabulary, BERT's pipeline); None if neither is."""
    data = Path(data)
    vocab = data / "vocab.txt"
    try:
        named = json.loads((data / "manifest.json").read_text("utf-8")).get("tokenizer")
    except (OSError, json.JSONDecodeError):
        named = None
    if named:
        path = Path(named)
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.suffix == ".json" and path.is_file() and vocab.is_file():
            tokens = vocab.read_text("utf-8").splitlines()
            if Tokenizer.from_file(str(path)).get_vocab() == {t: i for i, t in enumerate(tokens)}:
                return path
    return vocab if vocab.is_file() else None


def count_characters(texts: Iterable[str], tok: Tokenizer) -> Counter:
    """Count the characters the trainer will see: after the normaliser, without whitespace."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(tok.normalizer.normalize_str(text))  # Counter.update(str) counts in C
    for ch in [c for c in counts if c.isspace()]:
        del counts[ch]
    return counts


def unk_rate(tok: Tokenizer, texts: Iterable[str]) -> tuple[int, int]:
    """(number of [UNK] tokens, number of tokens) of `texts`, without special tokens."""
    unk_id = tok.token_to_id("[UNK]")
    unk = total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal unk, total
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            total += len(enc.ids)
            unk += enc.ids.count(unk_id)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == BATCH_DOCS:
            flush()
    flush()
    return unk, total


def missing_continuations(tok: Tokenizer, chars: Iterable[str]) -> list[str]:
    """The ``##c`` tokens `add_continuations` would add for `chars`."""
    return sorted({CONTINUATION + c for c in chars if _can_continue_word(c)}
                  - set(tok.get_vocab()))


def drop_last_merges(tok: Tokenizer, n: int) -> int:
    """Remove the `n` most recently learned multi-character pieces (the highest ids) to make
    room, renumbering the rest; specials, single characters and ``##c`` forms stay, and no
    kept piece is built from a removed one (WordPiece only merges earlier pieces). Returns how
    many were removed (fewer when there are not that many)."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    specials = set(SPECIAL_TOKENS.values())
    drop: set[str] = set()
    for token in reversed(tokens):
        if len(drop) == n:
            break
        if token not in specials and len(token.removeprefix(CONTINUATION)) > 1:
            drop.add(token)
    if drop:
        kept = [t for t in tokens if t not in drop]
        tok.model = WordPiece({t: i for i, t in enumerate(kept)}, unk_token="[UNK]",
                              continuing_subword_prefix=CONTINUATION)
    return len(drop)


def add_continuations(tok: Tokenizer, chars: Iterable[str]) -> int:
    """Append ``##c`` for every letter/digit `c` that lacks one (so an unseen Latin word splits
    into known pieces rather than becoming [UNK]); return how many were added."""
    vocab = tok.get_vocab()
    missing = missing_continuations(tok, chars)
    if missing:
        for token in missing:
            vocab[token] = len(vocab)
        tok.model = WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION)
    return len(missing)


def input_sizes(inputs: list[str]) -> dict[str, int | str]:
    """Each input file's size (built-in corpora by name): a cheap check that a resumed run
    reads the same text."""
    return {str(f): "built-in" if f in BUILTIN else Path(f).stat().st_size
            for f in resolve_inputs(inputs)}


def _finished(out: Path, settings: dict) -> dict | None:
    """The manifest of a vocabulary in `out` made with `settings`, if its files are intact."""
    path = out / "manifest.json"
    if not (path.is_file() and (out / "tokenizer.json").is_file()
            and (out / "vocab.txt").is_file()):
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if (manifest.get("kind") != "tokenizer" or manifest.get("settings") != settings
            or manifest.get("vocab_hash") != vocab_hash(out / "vocab.txt")):
        return None
    return manifest


def _texts(inputs: list[str], txt_mode: str, text_field: str, skips: SkipLog) -> Iterator[str]:
    return (d.text for d in iter_documents(inputs, txt_mode=txt_mode, text_field=text_field,
                                           skips=skips))


def _train(inputs: list[str], vocab_size: int, min_frequency: int, char_min_count: int,
           lowercase: bool, txt_mode: str, text_field: str, progress: bool,
           skips: SkipLog) -> tuple[Tokenizer, dict]:
    tok = bert_tokenizer(WordPiece({"[UNK]": 0}, unk_token="[UNK]"), lowercase)
    chars = count_characters(_texts(inputs, txt_mode, text_field, skips), tok)
    if not chars:
        raise UserError(f"no text in {' '.join(inputs)}; nothing to train a vocabulary on")
    alphabet = sorted(c for c, n in chars.items() if n >= char_min_count)
    # initial_alphabet characters get an infinite count in the trainer, so with
    # limit_alphabet = len(alphabet) exactly these survive and rarer ones are dropped.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
        special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), continuing_subword_prefix=CONTINUATION)
    # A quiet second pass over the text (skips were counted in the first).
    tok.train_from_iterator(_texts(inputs, txt_mode, text_field, SkipLog(warn=False)), trainer)
    # The ##c forms come on top of what the trainer learned: make room for them by dropping
    # its last merges, so the vocabulary has the size that was asked for.
    overflow = tok.get_vocab_size() + len(missing_continuations(tok, alphabet)) - vocab_size
    dropped = drop_last_merges(tok, overflow) if overflow > 0 else 0
    added = add_continuations(tok, alphabet)
    add_bert_template(tok)
    info = {"distinct_chars": len(chars), "alphabet": len(alphabet),
            "chars_below_min_count": len(chars) - len(alphabet),
            "continuations_added": added, "merges_dropped_for_continuations": dropped}
    if len(alphabet) + len(SPECIAL_TOKENS) > vocab_size:
        print(f"motian: warning: {len(alphabet)} characters occur at least {char_min_count} "
              f"times, more than vocab_size={vocab_size}; all are kept (vocabulary of "
              f"{tok.get_vocab_size()}). Raise char_min_count for a smaller one.",
              file=sys.stderr)
    return tok, info


def train_tokenizer(inputs: list[str], out: Path, vocab_size: int = 8000, min_frequency: int = 2,
                    char_min_count: int = 1, from_vocab: Path | None = None,
                    lowercase: bool = True, txt_mode: Literal["line", "blank"] = "line",
                    text_field: str = "text", resume: bool = True,
                    progress: bool = True) -> dict:
    """Train a BERT WordPiece vocabulary (every CJK character its own token), or adopt one.

    Writes out/vocab.txt, out/tokenizer.json and out/manifest.json (settings, counts and the
    [UNK] rate measured on the training text).

    Args:
        inputs: corpora: pd98, reviews, files, directories, globs or a `motian clean` output.
        out: directory to write the vocabulary to.
        vocab_size: the vocabulary's size (specials, characters, learned pieces and the ##
            forms of letters and digits together); it is smaller only when the text has fewer
            pieces to learn, larger only when more than this many characters occur at least
            char_min_count times (all are kept).
        min_frequency: how often a pair of pieces must occur to be merged.
        char_min_count: characters seen fewer times are left out (they become [UNK]).
        from_vocab: adopt this BERT vocab.txt (e.g. bert-base-chinese's) instead of training.
        lowercase: lower-case (and strip accents from) the text, as BERT-Chinese does.
        txt_mode: .txt documents: one per line, or separated by blank lines.
        text_field: the field of .jsonl records that holds the text.
        resume: keep a vocabulary already in `out` made from the same inputs and settings
            (--no-resume trains again; two trainings can differ in rare tied merges).
        progress: show the trainer's progress bar.
    """
    out = Path(out)
    skips = SkipLog()
    settings = {"vocab_size": vocab_size, "min_frequency": min_frequency,
                "char_min_count": char_min_count, "lowercase": lowercase,
                "txt_mode": txt_mode, "text_field": text_field,
                "from_vocab": str(from_vocab) if from_vocab else None,
                "from_vocab_hash": vocab_hash(from_vocab) if from_vocab else None,
                "input_sizes": input_sizes(inputs) if inputs else {}}
    previous = _finished(out, settings) if resume else None
    if previous is not None:
        print(f"vocabulary: {out} was made from the same inputs and settings; kept it "
              "(--no-resume trains again)", flush=True)
        return previous
    if from_vocab is not None:
        tok, info = tokenizer_from_vocab(Path(from_vocab), lowercase), {}
    else:
        tok, info = _train(inputs, vocab_size, min_frequency, char_min_count, lowercase,
                           txt_mode, text_field, progress, skips)
    special_token_ids(tok)  # fail before writing anything if one is missing
    tokens = vocab_tokens(tok)
    out.mkdir(parents=True, exist_ok=True)
    if from_vocab is not None and Path(from_vocab).resolve() != (out / "vocab.txt").resolve():
        shutil.copyfile(from_vocab, out / "vocab.txt")
    elif from_vocab is None:
        (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tok.save(str(out / "tokenizer.json"))
    unk, total = (unk_rate(tok, _texts(inputs, txt_mode, text_field, SkipLog(warn=False)))
                  if inputs else (0, 0))
    manifest = {
        "kind": "tokenizer", "vocab_hash": vocab_hash(out / "vocab.txt"),
        "inputs": [str(i) for i in inputs], "settings": settings,
        "counts": {"vocab_size": len(tokens), "tokens": total, "unk_tokens": unk,
                   "unk_rate": unk / max(total, 1), **info},
        "special_token_ids": special_token_ids(tok), "skipped": skips.to_dict(),
    }
    write_json_atomic(out / "manifest.json", manifest)
    print(f"vocabulary: {len(tokens)} tokens -> {out}; [UNK] {unk}/{total} tokens "
          f"({100 * unk / max(total, 1):.3f}%) of the training text", flush=True)
    return manifest
