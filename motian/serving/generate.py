"""`motian generate`: continue prompts with a causal language model (a `CausalLM`, e.g. the
final/ of `motian pretrain --recipe gpt-demo`).

    motian generate --model runs/gpt/final --prompts 今天 中国 --max-new-tokens 30
    motian generate --model runs/gpt/final --inputs prompts.txt --sample --top-p 0.9 --jsonl

Decoding: greedy (the default), sampling (`sample`, with `temperature`, `top_k`, `top_p`, from
a generator seeded by `seed`, so the same seed gives the same text) or beam search
(`num_beams` > 1, scores normalised by length ** `length_penalty`). A batch of prompts is
left-padded: every row's last prompt token sits in the last column, so one new column per step
serves all rows, and positions count real tokens only (a padded prompt reads exactly as it
would alone). The model keeps a `KVCache` of what it has read, so each step runs on one new
token per row; `cache=False` recomputes the whole sequence every step (the reference the cache
is tested against, and the way to run TUPE / DeBERTa positions, which the cache does not
support).

A prompt is read as pretraining rows begin: [CLS] and the prompt's tokens. Generation stops
at a stop token ([SEP], which ends every document in the packed pretraining stream, unless
`stop_tokens` says otherwise), after a stop string (`stop`; the text is cut before it), or
after `max_new_tokens`. [PAD], [CLS], [MASK] and [UNK] are never generated.

Layers: serving (5) over model (2) and data.tokenizer (2); the verb is `motian.generate`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from motian.data.tokenizer import decode_text, load_tokenizer, special_token_ids
from motian.errors import UserError
from motian.io import AtomicFile
from motian.model.artifact import (
    check_vocab,
    find_tokenizer,
    resolve_model_dir,
    tokenizer_vocab_hash,
)
from motian.model.heads import CausalLM, UnifiedLM
from motian.model.io import from_pretrained
from motian.model.seq2seq import Seq2SeqLM
from motian.model.transformer import KVCache
from motian.runtime import pick_device
from motian.serving.prefix_decoding import GrowingBatch, PrefixSequences, Seq2SeqSequences

GENERATORS = (CausalLM, UnifiedLM, Seq2SeqLM)  # UNILM and MASS: motian.serving.prefix_decoding


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen; `check` says what is out of range."""

    max_new_tokens: int = 50
    sample: bool = False  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int = 0  # sampling: only the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: the fewest most likely tokens holding this much probability
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum of log-probs / new tokens ** length_penalty
    seed: int = 0
    cache: bool = True  # keep keys and values of read tokens (else recompute every step)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UserError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.sample and self.num_beams > 1:
            raise UserError("beam search is deterministic: choose --sample or --num-beams > 1, "
                            "not both")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature} (for the most "
                            "likely token every time, leave --sample off: greedy decoding)")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise UserError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, "
                            f"top_p={self.top_p}")


@dataclass
class Generation:
    """What `generate_ids` returns, per prompt: the new tokens (without the stop token), why
    decoding ended ("stop_token", "stop_string" or "length"), and for beam search the
    length-normalised score of the returned sequence. `logits` (kept on request) are the raw
    next-token logits of every step, (B, vocab) each (greedy and sampling only)."""

    tokens: list[list[int]]
    finish: list[str]
    scores: list[float] | None = None
    logits: list[Tensor] | None = None


class _Sequences(GrowingBatch):
    """The batch being decoded by a causal LM (`GrowingBatch`); `logits` runs the model on what
    it has not read yet (everything again without a cache)."""

    def __init__(self, model: CausalLM, ids: Tensor, mask: Tensor, use_cache: bool):
        super().__init__(ids, mask, KVCache(model.config.layers) if use_cache else None,
                         unread=ids.shape[1])
        self.model = model

    @torch.no_grad()
    def logits(self) -> Tensor:
        """Next-token logits (B, vocab) in fp32 after the last column."""
        n = self.unread if self.cache is not None else self.ids.shape[1]
        out = self.model(self.ids[:, -n:], self.mask[:, -n:], position_ids=self.positions[:, -n:],
                         cache=self.cache, last_only=True)
        self.unread = 0
        return out.logits[:, -1].float()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
             ) -> tuple[Tensor, Tensor]:
    """Token id lists -> ids (B, P) and mask (B, P), padded on the left."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def generate_ids(model: CausalLM, prompts: Sequence[Sequence[int]], decoding: Decoding,
                 pad_id: int, stop_ids: Sequence[int] = (), banned: Sequence[int] = (),
                 is_stopped: Callable[[list[int]], bool] | None = None,
                 keep_logits: bool = False, mask_id: int | None = None) -> Generation:
    """Continue token id `prompts` (each non-empty) with `model`: the token-level engine of
    `motian generate`. `stop_ids` end a row (and are not returned); `banned` ids are never
    chosen; `is_stopped(new_tokens)` ends a row after a step (stop strings). `mask_id`: the
    [MASK] id, needed by a UnifiedLM or Seq2SeqLM (they predict at a [MASK])."""
    decoding.check()
    if not isinstance(model, GENERATORS):
        raise UserError(f"generation needs a causal language model (CausalLM), a UNILM "
                        f"(UnifiedLM) or a MASS encoder-decoder (Seq2SeqLM), got "
                        f"{type(model).__name__}")
    if not isinstance(model, CausalLM) and mask_id is None:
        raise UserError(f"a {type(model).__name__} predicts at a [MASK]: pass mask_id")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generation needs at least one prompt, each of at least one token")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    was_training = model.training
    model.eval()
    try:
        if decoding.num_beams > 1:
            return _beam_search(model, ids, mask, decoding, stop_ids, banned, is_stopped,
                                mask_id)
        return _sample(_sequences(model, ids, mask, decoding, mask_id), decoding, pad_id,
                       stop_ids, banned, is_stopped, keep_logits)
    finally:
        model.train(was_training)


def _sequences(model, ids: Tensor, mask: Tensor, d: Decoding, mask_id: int | None):
    """The decoding state of `model`'s family (all share `_Sequences`' interface)."""
    if isinstance(model, UnifiedLM):
        return PrefixSequences(model, ids, mask, d.cache, mask_id)
    if isinstance(model, Seq2SeqLM):
        return Seq2SeqSequences(model, ids, mask, d.cache, mask_id, d.max_new_tokens)
    return _Sequences(model, ids, mask, d.cache)


def choose(logits: Tensor, d: Decoding, generator: torch.Generator | None) -> Tensor:
    """The next token of each row (B,) from logits (B, vocab): the most likely, or a sample
    after temperature, top-k and top-p (nucleus, Holtzman et al. 2020) filtering."""
    if not d.sample:
        return logits.argmax(-1)
    logits = logits / d.temperature
    if d.top_k:
        kth = logits.topk(min(d.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if d.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the more likely ones already hold top_p: the most likely one stays
        drop = probs.cumsum(-1) - probs >= d.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def _sample(seqs: _Sequences, d: Decoding, pad_id: int, stop_ids: Sequence[int],
            banned: Sequence[int], is_stopped, keep_logits: bool) -> Generation:
    """Greedy decoding or sampling, all rows one token per step."""
    B = seqs.ids.shape[0]
    generator = None
    if d.sample:
        generator = torch.Generator(device=seqs.ids.device).manual_seed(d.seed)
    new: list[list[int]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    steps: list[Tensor] = []
    stops, banned = set(stop_ids), list(banned)
    for _ in range(d.max_new_tokens):
        logits = seqs.logits()
        if keep_logits:
            steps.append(logits.clone())
        if banned:
            logits[:, banned] = float("-inf")
        chosen = choose(logits, d, generator).tolist()
        for b, token in enumerate(chosen):
            if finish[b] is not None:
                continue
            if token in stops:
                finish[b] = "stop_token"
                continue
            new[b].append(token)
            if is_stopped is not None and is_stopped(new[b]):
                finish[b] = "stop_string"
        if all(f is not None for f in finish):
            break
        done = torch.tensor([f is not None for f in finish], device=seqs.ids.device)
        seqs.append(torch.where(done, pad_id, torch.tensor(chosen, device=done.device)))
    return Generation(new, [f or "length" for f in finish],
                      logits=steps if keep_logits else None)


def _beam_search(model: CausalLM, ids: Tensor, mask: Tensor, d: Decoding,
                 stop_ids: Sequence[int], banned: Sequence[int], is_stopped,
                 mask_id: int | None = None) -> Generation:
    """Beam search with K = num_beams beams per prompt, all prompts in one batch of B * K rows.

    Each step extends every live beam by every token and keeps, per prompt, the 2K best
    (sum of log-probabilities); among them, in order, a stop token closes a hypothesis
    (scored sum / new tokens ** length_penalty, the stop token counted) and the first K
    others become the next beams. A prompt is done once it has K closed hypotheses (HF's
    early_stopping=True), so K=1 is greedy decoding; at max_new_tokens the live beams are
    closed as they are. The best closed hypothesis is returned."""
    B, K = ids.shape[0], d.num_beams
    seqs = _sequences(model, ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), d,
                      mask_id)
    device = ids.device
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam to start: the others would repeat it
    beams: list[list[int]] = [[] for _ in range(B * K)]  # new tokens of row b * K + k
    closed: list[list[tuple[float, list[int], str]]] = [[] for _ in range(B)]
    done = [False] * B
    stops, banned = set(stop_ids), list(banned)

    def close(b: int, score: float, tokens: list[int], why: str) -> None:
        n = max(len(tokens) + (why == "stop_token"), 1)
        closed[b].append((score / n ** d.length_penalty, tokens, why))

    for _ in range(d.max_new_tokens):
        logp = seqs.logits().log_softmax(-1)  # (B * K, V)
        if banned:
            logp[:, banned] = float("-inf")
        V = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        best, where = total.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        best, where = best.tolist(), where.tolist()
        rows, tokens = [], []
        new_scores = torch.full((B, K), float("-inf"), device=device)
        for b in range(B):
            kept: list[tuple[int, int]] = []  # (beam, token)
            for score, w in zip(best[b], where[b]):
                if done[b] or score == float("-inf") or len(kept) == K:
                    break
                beam, token = divmod(w, V)
                if token in stops:
                    close(b, score, beams[b * K + beam], "stop_token")
                else:
                    new_scores[b, len(kept)] = score
                    kept.append((beam, token))
            if len(closed[b]) >= K or not kept:
                done[b] = True
            kept += [(0, 0)] * (K - len(kept))  # filler rows: score -inf, never read
            rows += [b * K + beam for beam, _ in kept]
            tokens += [token for _, token in kept]
        if all(done):
            break
        scores = new_scores
        beams = [beams[r] + [t] for r, t in zip(rows, tokens)]
        seqs.reorder(torch.tensor(rows, device=device))
        seqs.append(torch.tensor(tokens, device=device))
        if is_stopped is not None:  # a beam whose text holds a stop string is closed
            for r, tokens_r in enumerate(beams):
                b = r // K
                if not done[b] and scores[b, r % K] > float("-inf") and is_stopped(tokens_r):
                    close(b, float(scores[b, r % K]), tokens_r, "stop_string")
                    scores[b, r % K] = float("-inf")
                    done[b] = len(closed[b]) >= K or bool((scores[b] == float("-inf")).all())
    for b in range(B):
        if not done[b]:
            for k in range(K):
                if scores[b, k] > float("-inf"):
                    close(b, float(scores[b, k]), beams[b * K + k], "length")
    # A prompt can close nothing only when every token is banned or a stop token.
    best_of = [max(c, key=lambda h: h[0]) if c else (float("-inf"), [], "length")
               for c in closed]
    return Generation([h[1] for h in best_of], [h[2] for h in best_of],
                      scores=[h[0] for h in best_of])


# --------------------------------------------------------------------------- text


@dataclass
class Generator:
    """A causal LM and its tokenizer, loaded once; call it with prompts (texts)."""

    model: CausalLM
    tokenizer: Tokenizer

    @classmethod
    def load(cls, model: str | Path, tokenizer: str | Path | None = None,
             device: str = "cpu") -> Generator:
        """The model at `model` (a model directory such as run/final, a checkpoint or a run),
        refused unless it is a causal LM, with the tokenizer it was trained with."""
        directory = resolve_model_dir(Path(model))
        meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        head = meta.get("head")
        if head not in {cls.__name__ for cls in GENERATORS}:
            kind = ("a bidirectional (masked-LM) model" if head in ("MaskedLM", "PreTrainingModel")
                    else f"a {head} model")
            raise UserError(f"{model}: {kind} ({head}) cannot generate text: it sees both sides "
                            "of every token. Use a causal model, i.e. a CausalLM pretrained "
                            "with objective.kind causal (motian pretrain --recipe gpt-demo), "
                            "or a UNILM or MASS model (--recipe unilm-demo, mass-demo)")
        lm = from_pretrained(directory).to(pick_device(device)).eval()
        tokenizer = find_tokenizer(directory, tokenizer)
        tok = load_tokenizer(tokenizer)
        check_vocab(lm.vocab_hash, tokenizer_vocab_hash(tok), directory, tokenizer)
        return cls(lm, tok)

    def __call__(self, prompts: Sequence[str], decoding: Decoding = Decoding(),
                 stop: Sequence[str] = (), stop_tokens: Sequence[str] | None = None,
                 batch_size: int = 16) -> list[dict]:
        """One dict per prompt: prompt, text (the continuation), tokens (how many new),
        finish (stop_token, stop_string or length), and score for beam search."""
        decoding.check()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("no prompts: give at least one text to continue")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        special = special_token_ids(self.tokenizer)
        stop_ids = self._stop_ids(["[SEP]"] if stop_tokens is None else stop_tokens)
        banned = [special[k] for k in ("pad", "cls", "mask", "unk")]
        rows = [[special["cls"]] + self.tokenizer.encode(p, add_special_tokens=False).ids
                for p in prompts]
        self._check_length(rows, decoding.max_new_tokens)
        is_stopped = None
        if stop:
            def is_stopped(tokens: list[int]) -> bool:
                text = decode_text(self.tokenizer, tokens)
                return any(s in text for s in stop)
        results = []
        for i in range(0, len(rows), batch_size):
            out = generate_ids(self.model, rows[i:i + batch_size], decoding, special["pad"],
                               stop_ids, banned, is_stopped, mask_id=special["mask"])
            for j, tokens in enumerate(out.tokens):
                text = decode_text(self.tokenizer, tokens)
                for s in stop:  # the text ends before the first stop string
                    text = text.split(s)[0] if s in text else text
                result = {"prompt": prompts[i + j], "text": text, "tokens": len(tokens),
                          "finish": out.finish[j]}
                if out.scores is not None:
                    result["score"] = round(out.scores[j], 6)
                results.append(result)
        return results

    def _stop_ids(self, names: Sequence[str]) -> list[int]:
        ids = []
        for name in names:
            tid = self.tokenizer.token_to_id(name)
            if tid is None:
                raise UserError(f"stop token {name!r} is not in the vocabulary; give tokens of "
                                "it (e.g. [SEP] or 。), or use --stop for strings")
            ids.append(tid)
        return ids

    def _check_length(self, rows: list[list[int]], max_new_tokens: int) -> None:
        c = self.model.config
        longest = max(map(len, rows))
        if not c.extrapolates and longest + max_new_tokens > c.max_positions:
            raise UserError(f"the longest prompt ({longest} tokens with [CLS]) plus "
                            f"max_new_tokens={max_new_tokens} exceeds max_positions="
                            f"{c.max_positions} of this model's '{c.position}' positions, "
                            "which cannot go further; shorten the prompt or ask for fewer tokens")


def _read_prompts(inputs: Path | None) -> list[tuple[dict, str]]:
    """(record, prompt) per line of `inputs` (stdin when None): plain text lines, or JSON
    objects with "prompt" or "text" (an "id" is copied to the output)."""
    from motian.serving.predict import read_records

    found = []
    for where, record in read_records(inputs):
        prompt = record.get("prompt", record.get("text"))
        if not isinstance(prompt, str):
            raise UserError(f"{where}: no \"prompt\" or \"text\" string field")
        found.append((record, prompt))
    return found


def join_prompt(prompt: str, text: str) -> str:
    """The prompt followed by its continuation, a space between them only where both sides are
    Latin letters or digits (as decode_text spaces words)."""
    if prompt and text and prompt[-1].isascii() and prompt[-1].isalnum() and \
            text[0].isascii() and text[0].isalnum():
        return f"{prompt} {text}"
    return prompt + text


def generate(model: Path, prompts: list[str] | None = None, inputs: Path | None = None,
             out: Path | None = None, jsonl: bool = False, max_new_tokens: int = 50,
             sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, stop: list[str] | None = None,
             stop_tokens: list[str] | None = None, seed: int = 0, batch_size: int = 16,
             cache: bool = True, tokenizer: Path | None = None, device: str = "cpu",
             threads: int = 0) -> list[dict]:
    """Continue prompts with a causal language model (greedy, sampling or beam search).

    Prints each prompt followed by its continuation, one line per prompt (or JSON lines with
    --jsonl: prompt, text = the continuation, tokens, finish, score for beams). Returns the
    results as dicts. ``motian.generate("run/final", ["今天"], max_new_tokens=20)``.

    Args:
        model: a causal model: the final/ of a causal pretraining run (e.g. recipe gpt-demo),
            a checkpoint or the run directory.
        prompts: the texts to continue; otherwise lines of --inputs (or stdin).
        inputs: a file of prompts: plain text lines, or JSON lines with "prompt" or "text"
            (an "id" is copied to the output).
        out: file to write the output to; stdout when not given.
        jsonl: write JSON lines instead of text.
        max_new_tokens: the most tokens to generate per prompt.
        sample: sample the next token instead of taking the most likely one.
        temperature: sampling: divide the logits by this (below 1: safer, above 1: wilder).
        top_k: sampling: only from the k most likely tokens (0: no limit).
        top_p: sampling: only from the most likely tokens holding this much probability.
        num_beams: beam search with this many beams (1: greedy or sampling).
        length_penalty: beam search: score = log-probability / new tokens ** this (above 1
            favours longer outputs).
        stop: strings that end a generation (the text is cut before them).
        stop_tokens: vocabulary tokens that end a generation (default [SEP], the end of a
            document in pretraining).
        seed: sampling seed: the same seed gives the same text.
        batch_size: prompts decoded together.
        cache: keep the keys and values of read tokens (--no-cache recomputes every step;
            needed for TUPE and DeBERTa positions).
        tokenizer: the model's tokenizer, when its directory or run holds none.
        device: cpu, cuda, cuda:N or auto.
        threads: CPU threads (0: torch's default).
    """
    if threads:
        torch.set_num_threads(threads)
    if prompts is not None and inputs is not None:
        raise UserError("give --prompts or --inputs, not both")
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None:
        found = _read_prompts(inputs)
        records, prompts = [r for r, _ in found], [p for _, p in found]
    else:
        records = [{} for _ in prompts]
    if not prompts:
        raise UserError("no prompts: give --prompts TEXT ... or a file with --inputs")
    decoding = Decoding(max_new_tokens, sample, temperature, top_k, top_p, num_beams,
                        length_penalty, seed, cache)
    decoding.check()  # before loading the model
    generator = Generator.load(model, tokenizer, device)
    results = generator(prompts, decoding, stop or (), stop_tokens, batch_size)
    results = [({"id": r["id"]} if "id" in r else {}) | res for r, res in zip(records, results)]
    lines = [json.dumps(r, ensure_ascii=False) if jsonl else join_prompt(r["prompt"], r["text"])
             for r in results]
    if out is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    else:
        with AtomicFile(out, "w", encoding="utf-8", durable=True) as f:
            f.file.write("".join(line + "\n" for line in lines))
    return results

