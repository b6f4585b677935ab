"""ELECTRA's generator and the corruption that ELECTRA and MC-BERT train their main model on.

* ELECTRA (Clark, Luong, Le & Manning 2020, "ELECTRA: Pre-training Text Encoders as
  Discriminators Rather Than Generators", arXiv:2003.10555): a small masked-LM *generator*
  fills the masked positions with tokens sampled from its softmax; the *discriminator* (the
  model kept, `heads.ReplacedTokenDetection`) reads the corrupted row and says, at every token,
  whether it was replaced.
* MC-BERT (Xu, Sun, Ge, Li, Qin & Liu 2020, "MC-BERT: Efficient Language Pre-Training via a
  Meta Controller", arXiv:2006.05744): the generator (their "meta controller") also proposes
  k candidates per masked position, the original among them; the main model picks the
  original (multi-choice cloze) besides detecting replaced tokens.

This file owns the model side: `generator_config` (the generator's shape from the
discriminator's), `Generator` (which shares the discriminator's token embeddings, as in
ELECTRA's "Weight Sharing" experiments) and the sampling and corruption functions. The loss
that combines them is `motian.train.replaced`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from motian.model.config import ModelConfig
from motian.model.heads import ModelOutput, mlm_loss
from motian.model.transformer import MotianModel, init_weights


def generator_config(config: ModelConfig, width: float, depth: float) -> ModelConfig:
    """The generator's shape: `width` times the discriminator's heads, hidden size and FFN
    (ELECTRA's "generator size" multiplies all three: 1/4 for Small and Large, 1/3 for Base,
    in the paper's pre-training hyperparameters), `depth` times its layers (1 in the paper).
    The head size is kept, so hidden = heads * head size: 1/4 of a 4-head 128-wide model is
    one 32-wide head."""
    heads = max(1, round(config.heads * width))
    return config.replace(heads=heads, hidden=heads * config.head_dim,
                          ffn=max(1, round(config.ffn * width)),
                          layers=max(1, round(config.layers * depth)))


class SharedWordEmbedding(nn.Module):
    """The discriminator's token embedding table, read by the generator and projected to its
    (smaller) width, as ELECTRA does when the two differ in size (its `embeddings_project`).
    Gradients from both models reach the one table: that sharing is what lets the generator's
    softmax over the whole vocabulary train the discriminator's embeddings of every token, where
    the discriminator's own loss only updates the tokens present (ELECTRA's "Weight Sharing":
    tying the token embeddings gave most of the gain of tying all weights, and a generator
    smaller than the discriminator can share nothing else)."""

    def __init__(self, shared: nn.Embedding, hidden: int):
        super().__init__()
        self.shared = shared
        self.project = (nn.Linear(shared.embedding_dim, hidden)
                        if shared.embedding_dim != hidden else None)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.shared(input_ids)  # (B, L, discriminator hidden)
        return x if self.project is None else self.project(x)  # (B, L, generator hidden)


class GeneratorHead(nn.Module):
    """BERT's MLM head from the generator's width back to the embedding width (dense + GELU +
    LayerNorm), then the shared embedding matrix as output layer plus a bias."""

    def __init__(self, hidden: int, embedding_dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        """h (..., generator hidden) -> logits (..., vocab)."""
        return F.linear(self.norm(F.gelu(self.dense(h))), embedding, self.bias)


class Generator(nn.Module):
    """A small masked LM whose token embeddings are `word` (the discriminator's). Called like
    `MaskedLM` (`model(**batch)` with the loader's batch), so the common held-out MLM
    evaluation runs on it unchanged: `logits` (N, vocab) at `mlm_positions`."""

    def __init__(self, config: ModelConfig, word: nn.Embedding):
        super().__init__()
        self.config = config
        self.backbone = MotianModel(config)  # initialised in its constructor
        # Its own (B, L, generator hidden) table is dropped for the shared one; only the new
        # projection and the head need initialising (init_weights on the shared table would
        # re-draw the discriminator's embeddings).
        self.backbone.embeddings.word = SharedWordEmbedding(word, config.hidden)
        self.head = GeneratorHead(config.hidden, word.embedding_dim, config.vocab_size,
                                  config.layer_norm_eps)
        for module in (self.backbone.embeddings.word.project, self.head):
            if module is not None:
                init_weights(module, config)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings.word.shared

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, mlm_positions: Tensor | None = None,
                mlm_labels: Tensor | None = None) -> ModelOutput:
        h = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                          document_ids, mlm_positions)  # (N, hidden) at the masked positions
        logits = self.head(h, self.word_embeddings.weight)  # (N, vocab)
        out = ModelOutput(logits=logits, hidden_states=h)
        if mlm_labels is not None:
            out.loss = out.losses["mlm"] = mlm_loss(logits, mlm_labels)
        return out


# --------------------------------------------------------------------------- sampling


def gumbel_noise(shape: torch.Size, device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise, -log(-log u): argmax(logits + noise) is a sample of
    softmax(logits), and the top k of (logits + noise) are k draws without replacement
    (Kool, van Hoof & Welling 2019, "Stochastic Beams and Where to Find Them",
    arXiv:1903.06059). `generator` gives the held-out evaluation its own fixed stream; training
    draws from the global one, which the loop reseeds before every micro-batch (exact resume)."""
    u = torch.rand(shape, device=device, generator=generator)
    return -torch.log(-torch.log(u.clamp(min=1e-20)))


@torch.no_grad()
def sample_replacements(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(N, vocab) generator logits -> (N,) one token each, drawn from their softmax. No
    gradient passes (sampling is discrete; ELECTRA trains the generator by MLM only)."""
    logits = logits.float()
    return (logits + gumbel_noise(logits.shape, logits.device, generator)).argmax(-1)


@torch.no_grad()
def sample_candidates(logits: Tensor, original: Tensor, k: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """MC-BERT's candidate sets: (N, k) token ids, the original in column 0 and k - 1
    distinct other tokens drawn from softmax(logits) without replacement (the original
    excluded). The column of the original carries no information to the main model: each
    candidate's score is its own dot product with the hidden state, so the softmax over the k
    scores is the same in any column order."""
    if k < 2 or k > logits.shape[-1]:
        raise ValueError(f"k must be in [2, vocab size {logits.shape[-1]}], got {k}")
    scores = logits.float() + gumbel_noise(logits.shape, logits.device, generator)
    scores.scatter_(1, original[:, None], float("-inf"))
    others = scores.topk(k - 1, dim=-1).indices  # (N, k - 1), distinct by construction
    return torch.cat([original[:, None], others], dim=1)


def corrupt(input_ids: Tensor, positions: Tensor, original: Tensor,
            sampled: Tensor) -> tuple[Tensor, Tensor]:
    """The discriminator's input: `input_ids` (B, L) with the flat `positions` (N,) set to
    `sampled` (N,), every other token untouched; and the (B, L) bool map of replaced tokens.
    A sample equal to the original token counts as original (ELECTRA section 2)."""
    flat = input_ids.reshape(-1).clone()
    flat[positions] = sampled
    replaced = torch.zeros_like(flat, dtype=torch.bool)
    replaced[positions] = sampled != original
    return flat.view_as(input_ids), replaced.view_as(input_ids)
