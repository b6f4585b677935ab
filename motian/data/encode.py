"""`motian encode`: text → token shards with word starts, sentence starts and synonym rows.

Per chunk of documents (one chunk = one shard, see `motian.data.shards` for the format):

1. jieba cuts every document into words (one `jieba.Tokenizer` per process, user dictionary
   loaded if given, HMM on for unknown words);
2. the tokenizer encodes the whole chunk in one `encode_batch` call, with character offsets;
3. `align_chunk` maps every token to the jieba word holding its first character, vectorised
   over the chunk with numpy: a token starts a word when its word differs from the previous
   token's, except ``##`` continuation pieces, which never start one, so a Latin/digit run
   that jieba split ("iPhone" "12") stays one word; [UNK] covers a whole BERT word and is
   aligned by its start like any token. Sentence starts follow 。！？!?… (and ". "), paragraph
   starts follow a newline;
4. a word start gets the row of its word in the synonym table when its tokens span exactly
   the jieba word and the row's candidates have its token count;
5. with ``entities``, named entities (from POS tags or an entity list) are marked as runs of
   tokens in the flags (`motian.data.entities`), for ERNIE's entity-level masking.

Shard i holds documents [i * shard_docs, (i + 1) * shard_docs) of the input stream (closed
earlier once it holds shard_mb MB of text), so the output is the same for any number of
workers. The run follows the stage runner's rules (`motian.data.stage`): workers encode chunks
in parallel with at most two chunks per worker in flight (bounded memory), results come back in
order, and the parent commits every finished shard (files made durable, then the manifest
written atomically); a rerun skips the shards the manifest lists, after checking that
settings, vocabulary and inputs are the same, and refuses other ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import re
import time
from array import array
from collections.abc import Iterator
from importlib.metadata import version
from itertools import chain, repeat
from pathlib import Path
from typing import Literal

import numpy as np

from motian.data.entities import DEFAULT_TAGS, EntityList, mark_entities
from motian.data.shards import (
    ARRAYS,
    ENTITY_START,
    FORMAT_VERSION,
    PARAGRAPH_START,
    SENTENCE_START,
    WORD_START,
    SynonymTable,
    shard_name,
    vocab_hash,
    write_shard,
)
from motian.data.sources import Document, iter_documents, synonyms_path
from motian.data.stage import ByteProgress, StageDir, ordered_pool
from motian.data.synonyms import build_synonym_table
from motian.data.tokenizer import (
    CONTINUATION,
    input_sizes,
    load_tokenizer,
    special_token_ids,
    vocab_tokens,
)
from motian.errors import SkipLog, UserError
from motian.io import sha256_file

# A sentence ends after a run of end marks and any closing quotes/brackets that follow them.
SENTENCE_END = re.compile(r"(?:[。！？!?…]+|\.(?=\s))[”’」』）)\"']*")
NEWLINE = re.compile("\n")
SUB_BATCH_DOCS = 256  # documents per encode_batch call inside a shard

# ----------------------------------------------------------------------------- alignment


def sentence_boundaries(text: str) -> tuple[list[int], list[int]]:
    """Character positions where a sentence and where a paragraph starts (besides 0)."""
    paragraphs = [m.end() for m in NEWLINE.finditer(text)] if "\n" in text else []
    sentences = [m.end() for m in SENTENCE_END.finditer(text)]
    return sentences, paragraphs


def _starts_after(boundaries: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """True where a position is the first of `positions` at or after a new boundary."""
    region = np.searchsorted(boundaries, positions, side="right")  # (T,)
    first = np.ones(len(positions), bool)
    first[1:] = region[1:] != region[:-1]
    return first


def align_chunk(texts: list[str], word_len: np.ndarray, word_row: np.ndarray,
                tokens: np.ndarray, span: np.ndarray, n_tok: np.ndarray,
                is_continuation: np.ndarray, row_length: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flags and synonym rows of the tokens of a chunk of documents.

    jieba's words of all `texts`, back to back, have lengths `word_len` (W,) (they cover every
    character) and synonym rows `word_row` (W,) (-1: none). `tokens` (T,) are the tokens of
    all documents, `span` (T, 2) their (start, end) character offsets within their document,
    `n_tok` (D,) the tokens per document. Returns (flags (T,) uint8, synonyms (T,) int32,
    docs (D + 1,) int64 offsets).
    """
    docs = np.zeros(len(n_tok) + 1, np.int64)
    np.cumsum(n_tok, out=docs[1:])
    # Work in chunk-wide character positions: document d starts at char_base[d].
    char_base = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=char_base[1:])
    span = span + np.repeat(char_base[:-1], n_tok)[:, None]  # (T, 2)
    word_edge = np.zeros(len(word_len) + 1, np.int64)
    np.cumsum(word_len, out=word_edge[1:])  # word w covers chars [edge[w], edge[w + 1])
    if word_edge[-1] != char_base[-1]:
        raise ValueError("the words do not cover the text character for character")
    char_word = np.repeat(np.arange(len(word_len)), word_len)  # (C,) word of each character
    token_word = char_word[span[:, 0]]  # (T,) the word holding each token's first character

    doc_first = np.zeros(len(tokens), bool)
    doc_first[docs[:-1][n_tok > 0]] = True
    starts = np.ones(len(tokens), bool)
    starts[1:] = token_word[1:] != token_word[:-1]
    starts = (starts & ~is_continuation[tokens]) | doc_first

    flags = np.where(starts, WORD_START, 0).astype(np.uint8)
    sentence, paragraph = _boundaries(texts, char_base)
    flags |= np.where(_starts_after(sentence, span[:, 0]), SENTENCE_START, 0).astype(np.uint8)
    flags |= np.where(_starts_after(paragraph, span[:, 0]), PARAGRAPH_START, 0).astype(np.uint8)
    synonyms = _synonym_rows(span, starts, token_word, word_edge, word_row, row_length)
    return flags, synonyms, docs


def _boundaries(texts: list[str], char_base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chunk-wide sorted sentence and paragraph start positions (every document start is
    both)."""
    sentence, paragraph = [], []
    for text, base in zip(texts, char_base[:-1].tolist()):
        s, p = sentence_boundaries(text)
        sentence.append(base)
        sentence.extend(base + i for i in sorted(set(s) | set(p)))
        paragraph.append(base)
        paragraph.extend(base + i for i in p)
    return np.array(sentence, np.int64), np.array(paragraph, np.int64)


def _synonym_rows(span: np.ndarray, starts: np.ndarray, token_word: np.ndarray,
                  word_edge: np.ndarray, word_row: np.ndarray,
                  row_length: np.ndarray) -> np.ndarray:
    """Row of the synonym table at each word start whose tokens cover exactly one jieba word
    that has a row of candidates with as many tokens; -1 elsewhere."""
    synonyms = np.full(len(starts), -1, np.int32)
    first = np.flatnonzero(starts)  # (S,) first token of each aligned word
    if not len(first):
        return synonyms
    last = np.append(first[1:], len(starts)) - 1  # (S,) its last token
    w = token_word[first]
    exact = ((token_word[last] == w) & (span[first, 0] == word_edge[w])
             & (span[last, 1] == word_edge[w + 1]))
    row = np.where(exact, word_row[w], -1)  # (S,)
    ok = row >= 0
    ok[ok] = row_length[row[ok]] == (last - first + 1)[ok]
    synonyms[first[ok]] = row[ok]
    return synonyms


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(tokenizer: str, user_dict: str | None, synonyms_file: str | None,
                 out: str, entity_list: str | None = None) -> None:
    """Load the tokenizer, jieba (with the user dictionary), the synonym index and the entity
    list once per process."""
    import jieba

    if mp.parent_process() is not None:
        # Each worker is one process; rayon threads inside it would only oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    jieba.setLogLevel(logging.WARNING)
    cutter = jieba.Tokenizer()
    cutter.initialize()
    if user_dict:
        cutter.load_userdict(user_dict)
    tok = load_tokenizer(tokenizer)
    tokens = vocab_tokens(tok)
    table = SynonymTable.load(Path(synonyms_file)) if synonyms_file else SynonymTable.empty()
    _WORKER.update(
        tok=tok, cutter=cutter, out=Path(out), unk=tok.token_to_id("[UNK]"),
        dtype=np.uint16 if len(tokens) <= 1 << 16 else np.uint32,
        is_continuation=continuation_mask(tok),
        rows={w: r for r, w in enumerate(table.words)}, row_length=table.length,
        entity_list=EntityList.load(entity_list) if entity_list else None)


def _tokenize(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (T,), span (T, 2), n_tok (D,)) of `texts`, in sub-batches so the tokenizer's
    Encoding objects and Python lists (~300 bytes a token) never exist for a whole shard."""
    parts = []
    for i in range(0, len(texts), SUB_BATCH_DOCS):
        encodings = tok.encode_batch(texts[i:i + SUB_BATCH_DOCS], add_special_tokens=False)
        n_tok = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        total = int(n_tok.sum())
        tokens = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, total)
        span = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                           np.int64, 2 * total).reshape(-1, 2)
        parts.append((tokens, span, n_tok))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def continuation_mask(tok) -> np.ndarray:
    """(V,) bool: which ids are ``##`` continuation pieces (they never start a word)."""
    return np.array([t.startswith(CONTINUATION) and len(t) > len(CONTINUATION)
                     for t in vocab_tokens(tok)])


def encode_texts(texts: list[str], tok, cutter, rows: dict[str, int], row_length: np.ndarray,
                 is_continuation: np.ndarray, entities: list[list[tuple[int, int]]] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole per-document work of `motian encode`, for any caller that needs the same
    tokens and word flags (the pair task encodes click logs with it): jieba `cutter`, the
    tokenizer, `align_chunk`, and the `entities` (character spans per document) marked in the
    flags when given. Returns (tokens (T,) int64, flags (T,) uint8, synonym rows (T,) int32,
    docs (D + 1,) int64 offsets)."""
    # Keep only what alignment needs of jieba's words: lengths and synonym rows (compact
    # arrays, not a million str objects).
    word_len, word_row = array("q"), array("q")
    for text in texts:
        words = list(cutter.cut(text, HMM=True))
        word_len.extend(map(len, words))
        word_row.extend(map(rows.get, words, repeat(-1)))
    tokens, span, n_tok = _tokenize(tok, texts)
    flags, synonyms, docs = align_chunk(
        texts, np.frombuffer(word_len, np.int64), np.frombuffer(word_row, np.int64),
        tokens, span, n_tok, is_continuation, row_length)
    if entities is not None:
        flags = mark_entities(flags, span, n_tok, entities, [len(t) for t in texts])
    return tokens, flags, synonyms, docs


def encode_chunk(index: int, texts: list[str],
                 entities: list[list[tuple[int, int]]] | None = None) -> dict:
    """Encode one chunk of documents into shard `index` (in a worker set up by
    `_init_worker`); return its manifest entry. `entities`: the documents' entity spans from
    their tags, if any; else those the worker's entity list finds, if it has one."""
    w = _WORKER
    if entities is None and w["entity_list"] is not None:
        entities = [w["entity_list"].find(t) for t in texts]
    tokens, flags, synonyms, docs = encode_texts(texts, w["tok"], w["cutter"], w["rows"],
                                                 w["row_length"], w["is_continuation"],
                                                 entities)
    entry = write_shard(w["out"], index, tokens.astype(w["dtype"]), flags, synonyms, docs)
    entry.update(
        unk_tokens=int((tokens == w["unk"]).sum()),
        word_starts=int(np.count_nonzero(flags & WORD_START)),
        sentence_starts=int(np.count_nonzero(flags & SENTENCE_START)),
        synonym_words=int(np.count_nonzero(synonyms >= 0)),
        entities=int(np.count_nonzero(flags & ENTITY_START)),
        text_bytes=sum(len(t.encode("utf-8")) for t in texts))
    return entry


# ----------------------------------------------------------------------------- the run


def _chunks(docs: Iterator[Document], shard_docs: int, shard_bytes: int
            ) -> Iterator[tuple[int, list[Document]]]:
    """Cut the document stream into shards: `shard_docs` documents, or fewer once they hold
    `shard_bytes` of text. Depends only on the stream, never on the number of workers."""
    chunk: list[Document] = []
    size = 0
    index = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text.encode("utf-8"))
        if len(chunk) >= shard_docs or size >= shard_bytes:
            yield index, chunk
            index, chunk, size = index + 1, [], 0
    if chunk:
        yield index, chunk


def _prepare_vocab(tokenizer: Path, out: Path):
    """Load the tokenizer and write its vocabulary to out/vocab.txt.tmp (moved into place only
    once the run is known to go ahead, so a refused resume leaves the old one). Returns
    (tokenizer, the temporary file, its vocabulary hash)."""
    tok = load_tokenizer(tokenizer)
    special_token_ids(tok)
    tmp = out / "vocab.txt.tmp"
    tmp.write_text("\n".join(vocab_tokens(tok)) + "\n", encoding="utf-8")
    digest = vocab_hash(tmp)
    given = tokenizer / "vocab.txt" if tokenizer.is_dir() else None
    if given is not None and given.is_file() and vocab_hash(given) != digest:
        raise UserError(f"{tokenizer}: tokenizer.json and vocab.txt list different tokens; "
                        "write the directory again with `motian tokenizer`")
    return tok, tmp, digest


def _check_user_dict(user_dict: Path | None) -> Path | None:
    if user_dict is None:
        return None
    user_dict = Path(user_dict)
    if not user_dict.is_file():
        raise UserError(f"{user_dict}: no such jieba user dictionary")
    try:
        user_dict.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{user_dict}: not UTF-8 (byte {err.start}); jieba dictionaries "
                        "must be UTF-8") from err
    return user_dict


def _settings(inputs: list[str], tok, digest: str, user_dict: Path | None,
              synonym_min_chars: int | None, shard_docs: int, shard_mb: float, txt_mode: str,
              text_field: str) -> dict:
    """Everything the shards depend on; a resumed run must match it exactly."""
    return {
        "inputs": [str(i) for i in inputs],
        "input_sizes": input_sizes(inputs),
        "vocab_hash": digest,
        # normaliser settings (lower-casing...) change ids as much as the vocabulary does
        "tokenizer_sha256": hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest(),
        "user_dict": str(user_dict) if user_dict else None,
        "user_dict_sha256": sha256_file(user_dict) if user_dict else None,
        # None: no synonyms recorded
        "synonym_min_chars": synonym_min_chars,
        "cilin_sha256": sha256_file(synonyms_path()) if synonym_min_chars is not None else None,
        "shard_docs": shard_docs, "shard_mb": shard_mb, "txt_mode": txt_mode,
        "text_field": text_field, "jieba": version("jieba"),
        "tokenizers": version("tokenizers"),
    }


# Every file `encode` writes per shard, and its manifest; --no-resume deletes them.
OWNED_FILES = rf"(shard-\d{{5}}\.({'|'.join(ARRAYS)})\.npy|manifest\.json)(\.tmp(\.npy)?)?"


def _previous_run(out: Path, settings: dict, resume: bool) -> tuple[StageDir, dict[int, dict]]:
    """The output directory after the resume check, and the finished shards of an earlier
    run with the same settings ({} when starting over)."""
    stage = StageDir(out, "encoded", {"format_version": FORMAT_VERSION, "settings": settings},
                     OWNED_FILES, resume)
    old = stage.previous or {}
    done = {e["index"]: e for e in old.get("shards", [])
            if all((out / f"{e['name']}.{k}.npy").is_file() for k in ARRAYS)}
    return stage, done


def _summary(manifest: dict, seconds: float, out: Path, new_bytes: int) -> str:
    c = manifest["counts"]
    tokens, words, mb = max(c["tokens"], 1), max(c["word_starts"], 1), new_bytes / 1e6
    resumed = (f"; {manifest['resumed_shards']} shards were done by an earlier run"
               if manifest["resumed_shards"] else "")
    return (f"encoded {c['docs']:,} documents, {c['tokens']:,} tokens "
            f"([UNK] {100 * c['unk_tokens'] / tokens:.3f}%), "
            f"word starts {100 * c['word_starts'] / tokens:.1f}% of tokens, "
            f"words with a synonym {100 * c['synonym_words'] / words:.1f}%, "
            + (f"entities {c['entities']:,}, " if "entities" in manifest["settings"] else "")
            + f"{len(manifest['shards'])} shards -> {out} "
            f"({mb:.1f} MB of text in {seconds:.1f} s, {mb / max(seconds, 1e-9):.2f} MB/s"
            f"{resumed})")


def encode(inputs: list[str], out: Path, tokenizer: Path, user_dict: Path | None = None,
           synonyms: bool = True, synonym_min_chars: int = 2, workers: int = 0,
           shard_docs: int = 8192, shard_mb: float = 4.0, resume: bool = True,
           txt_mode: Literal["line", "blank"] = "line", text_field: str = "text",
           entities: str | None = None, entity_tags: str = ",".join(DEFAULT_TAGS),
           progress: bool = True) -> dict:
    """Tokenise, segment words with jieba and attach Cilin synonyms into memory-mapped shards.

    Writes out/manifest.json, out/vocab.txt, out/synonyms.npz and out/shard-*.npy (token ids,
    word/sentence/paragraph start flags, synonym rows, document offsets); shards do not depend
    on the sequence length. Running the same command again continues an interrupted run.

    Args:
        inputs: corpora: usually the directory written by `motian clean`; also pd98, reviews,
            files, directories or globs.
        out: directory for the shards and the manifest.
        tokenizer: the directory written by `motian tokenizer`, a tokenizer.json or a BERT
            vocab.txt.
        user_dict: a jieba user dictionary (one "word [freq] [tag]" per line) for domain terms.
        synonyms: record same-length HIT Cilin synonyms for synonym replacement.
        synonym_min_chars: only words this long get synonyms (Cilin's single characters are
            noisy: 的 would get 鹄).
        workers: processes; 0 uses every core, 1 runs in this process.
        shard_docs: documents per shard.
        shard_mb: a shard is closed early once it holds this many MB of text.
        resume: continue an earlier run in `out` (--no-resume encodes everything again).
        txt_mode: .txt documents: one per line, or separated by blank lines.
        text_field: the field of .jsonl records that holds the text.
        entities: mark named entities for entity masking (`data.masking: ernie`): "tags" takes
            them from POS tags (pd98's nr/ns/nt; user .txt files are then read as tagger
            output, one document per line of word/TAG tokens); a file path is an entity list
            (one entity per line), matched leftmost-longest in the text.
        entity_tags: with --entities tags: the tags that mark an entity, comma-separated.
        progress: show a progress bar.
    """
    t0 = time.perf_counter()
    out, tokenizer = Path(out), Path(tokenizer)
    if shard_docs < 1 or shard_mb <= 0:
        raise UserError("shard_docs and shard_mb must be positive")
    user_dict = _check_user_dict(user_dict)
    entity_spec, tags, entity_list = _entity_settings(entities, entity_tags)
    out.mkdir(parents=True, exist_ok=True)
    tok, vocab_tmp, digest = _prepare_vocab(tokenizer, out)
    settings = _settings(inputs, tok, digest, user_dict,
                         synonym_min_chars if synonyms else None, shard_docs, shard_mb, txt_mode,
                         text_field)
    if entity_spec is not None:  # absent otherwise: runs without entities resume as before
        settings["entities"] = entity_spec
    try:
        stage, done = _previous_run(out, settings, resume)
    except UserError:
        vocab_tmp.unlink()
        raise
    os.replace(vocab_tmp, out / "vocab.txt")
    manifest = {
        "kind": "encoded", "format_version": FORMAT_VERSION, "vocab_hash": digest,
        "vocab_file": str(out / "vocab.txt"), "tokenizer": str(tokenizer),
        "special_token_ids": special_token_ids(tok), "settings": settings,
        "complete": False, "shards": [],
    }
    synonyms_file = _write_synonyms(tok, out, synonym_min_chars if synonyms else None, manifest)
    skips = SkipLog()
    docs = iter_documents(inputs, txt_mode=txt_mode, text_field=text_field, skips=skips,
                          tags=tags)
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    total = None
    if progress or workers > 1:
        total, n_shards = _plan(inputs, txt_mode, text_field, shard_docs, int(shard_mb * 1e6),
                                tags)
        workers = max(1, min(workers, n_shards - len(done)))
    bar = ByteProgress("encode", total, progress)
    init = (str(tokenizer), str(user_dict) if user_dict else None,
            str(synonyms_file) if synonyms_file else None, str(out), entity_list)
    try:
        finished = _run_chunks(_chunks(docs, shard_docs, int(shard_mb * 1e6)), done, init,
                               workers, manifest, stage, bar)
    finally:
        bar.close(finished=False)
    _finish(manifest, finished, skips, len(done), stage)
    new_bytes = sum(e["text_bytes"] for i, e in finished.items() if i not in done)
    print(_summary(manifest, time.perf_counter() - t0, out, new_bytes), flush=True)
    return manifest


def _write_synonyms(tok, out: Path, min_chars: int | None, manifest: dict) -> Path | None:
    """Build the synonym table (deterministic, so a resumed run writes the same file) and save
    it as out/synonyms.npz; with `min_chars` None, no synonyms."""
    path = out / "synonyms.npz"
    if min_chars is None:
        path.unlink(missing_ok=True)
        return None
    # Each candidate carries its shared Cilin groups and its count in jieba's bundled dictionary
    # (fixed by the jieba version in the settings), for `synonym_weighting="frequency"`.
    table, _ = build_synonym_table(tok, min_chars=min_chars)
    table.save(path)
    manifest["synonym_table"] = {"rows": len(table.words), "candidates": int(table.count.sum()),
                                 "weights": "shared Cilin groups, jieba dictionary counts"}
    return path


def _finish(manifest: dict, finished: dict[int, dict], skips: SkipLog, resumed: int,
            stage: StageDir) -> None:
    """Totals, skipped input and `complete: true`, written atomically: the run is done."""
    manifest["shards"] = [finished[i] for i in sorted(finished)]
    keys = ("n_docs", "n_tokens", "unk_tokens", "word_starts", "sentence_starts",
            "synonym_words", "entities", "text_bytes")
    sums = {k: sum(e.get(k, 0) for e in manifest["shards"]) for k in keys}
    manifest["counts"] = {"docs": sums.pop("n_docs"), "tokens": sums.pop("n_tokens"), **sums}
    manifest.update(complete=True, skipped=skips.to_dict(), resumed_shards=resumed)
    stage.commit(manifest)


def _plan(inputs: list[str], txt_mode: str, text_field: str, shard_docs: int,
          shard_bytes: int, tags: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(bytes of text, number of shards) of the run: one quick read of the input (reading is
    ~20x faster than jieba, a few percent of the run) that gives the progress bar an exact ETA
    and keeps a big machine from starting more workers than there are shards."""
    docs = iter_documents(inputs, txt_mode=txt_mode, text_field=text_field,
                          skips=SkipLog(warn=False), tags=tags)
    total = n_shards = 0
    for _index, chunk in _chunks(docs, shard_docs, shard_bytes):
        total += sum(len(d.text.encode("utf-8")) for d in chunk)
        n_shards += 1
    return total, n_shards


def _run_chunks(chunks: Iterator[tuple[int, list[Document]]], done: dict[int, dict],
                init: tuple, workers: int, manifest: dict, stage: StageDir, bar: ByteProgress
                ) -> dict[int, dict]:
    """Encode every chunk not in `done` (in this process or a pool of `workers`), committing
    each finished shard as it lands, in order; return index → entry of all shards."""
    finished = dict(done)
    jobs = (((index, _where(chunk[0])),
             (index, [d.text for d in chunk], _chunk_entities(chunk)))
            for index, chunk in chunks if not _check_done(index, chunk, done, bar))
    with contextlib.closing(ordered_pool(encode_chunk, jobs, workers, _init_worker,
                                         init)) as results:
        for (index, first), entry in results:
            entry["index"] = index
            entry["first"] = first  # checked on resume: the input must not have moved
            finished[index] = entry
            manifest["shards"] = [finished[i] for i in sorted(finished)]
            stage.commit(manifest, [stage.out / f"{entry['name']}.{k}.npy" for k in ARRAYS])
            bar.advance(entry["text_bytes"])
    return finished


def _chunk_entities(chunk: list[Document]) -> list[list[tuple[int, int]]] | None:
    """The entity spans of a chunk's documents when they were read with tags, else None."""
    return None if chunk[0].entities is None else [d.entities or [] for d in chunk]


def _entity_settings(entities: str | None, entity_tags: str
                     ) -> tuple[dict | None, tuple[str, ...] | None, str | None]:
    """(settings.entities, the tags to read, the entity list file) of `encode --entities`;
    an entity list is read once here so a bad line stops the run before any work."""
    if entities is None:
        return None, None, None
    if str(entities) == "tags":
        tags = tuple(t.strip() for t in entity_tags.split(",") if t.strip())
        if not tags:
            raise UserError("--entity-tags lists no tag; give e.g. nr,ns,nt")
        return {"source": "tags", "tags": list(tags)}, tags, None
    found = EntityList.load(entities)
    return ({"source": "list", "file": str(entities), "sha256": sha256_file(Path(entities)),
             "entities": len(found.entities)}, None, str(entities))


def _where(doc: Document) -> str:
    return f"{doc.source}:{doc.line}"


def _check_done(index: int, chunk: list[Document], done: dict[int, dict],
                bar: ByteProgress) -> bool:
    """True if shard `index` was finished by an earlier run (after checking that it started
    at the same document, i.e. the input did not change under it)."""
    entry = done.get(index)
    if entry is None:
        return False
    if entry.get("first") != _where(chunk[0]):
        raise UserError(f"shard {shard_name(index)} of the earlier run started at "
                        f"{entry.get('first')} but now starts at {_where(chunk[0])}: the input "
                        "changed since. Use --no-resume to encode again from scratch.")
    bar.advance(entry["text_bytes"])
    return True
