"""Transformer-XL pretraining (Dai et al. 2019, arXiv:1901.02860): `objective.kind:
transformer-xl` with `objective.memory: M` (recipe `motian/configs/xl-demo.yaml`).

A kind of its own rather than `kind: causal` plus a model option, because what changes is not
the model alone: the batches must be consecutive segments of fixed streams
(`motian.data.stream`, never the shuffled packed rows), and the objective carries state from
one step to the next (the memory), which must be checkpointed. The model is
`motian.model.xl.TransformerXLLM`.

**The memory is state of the objective.** `memory` (layers, P, M, hidden) float32 holds, for
each of the P stream parts (rows of the global batch) and each layer, the states that entered
that layer for the part's last M tokens; `memory_length` (P,) how many of them are real (0 at
the start). Both are frozen parameters (never optimised), so `extra_state` saves them in every
checkpoint's objective.safetensors and a resume restores them: the resumed run continues bit
for bit (tests/test_transformer_xl.py). Each micro-batch reads the memory of its rows' parts
(`stream_part`) and writes their new memory after its forward, detached (no gradient into an
earlier segment, the paper's SG). One process only: with several, each rank's parts would be
its own state and the checkpoint holds rank 0's.

**Evaluation.** Over a held-out stream (the held-out documents, `eval.batch` parts, up to
`eval.rows` segments in all) read in order with the memory carried, and again with no memory:
`loss`/`perplexity` and `loss_no_memory`/`perplexity_no_memory`, so the log shows what the
recurrence buys.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from motian.data.stream import StreamLoader, document_stream
from motian.errors import UserError
from motian.model.xl import TransformerXLLM, check_xl_config, next_memory
from motian.train.distributed import DistInfo
from motian.train.fit import Objective


def check_xl_recipe(recipe, world_size: int = 1) -> None:
    """Refuse recipes under which the memory would be meaningless or not resumable."""
    o, d = recipe.objective, recipe.data
    if o.kind != "transformer-xl":
        if o.memory:
            raise UserError(f"recipe {recipe.name}: objective.memory needs objective.kind: "
                            f"transformer-xl, whose loader streams each part's segments in "
                            f"order; kind {o.kind} reads shuffled packed rows, where a memory "
                            "of the previous row's text would be another document's")
        return
    if d.pair_task != "none" or not d.cross_document_attention:
        raise UserError(f"recipe {recipe.name}: transformer-xl reads one contiguous token "
                        "stream per row; set data.pair_task: none and "
                        "data.cross_document_attention: true (document-aware packing restarts "
                        "positions and shuffles rows)")
    if len(recipe.stages) != 1:
        raise UserError(f"recipe {recipe.name}: transformer-xl keeps one memory per row of "
                        "the global batch, so it trains in one stage (one segment length and "
                        f"global batch); this recipe has {len(recipe.stages)}")
    if world_size > 1:
        raise UserError("transformer-xl runs in one process for now: the memory of each "
                        "rank's rows would be per-rank state, which the checkpoint does not "
                        "gather")


class TransformerXLPretrainer(Objective):
    """Next-token loss over stream segments with the per-part memory (module docstring)."""

    def __init__(self, model: TransformerXLLM, parts: int, eval_tokens=None,
                 eval_parts: int = 1, eval_segments: int = 1, seq_len: int = 128):
        super().__init__()
        self.model = model
        c, M = model.config, model.memory
        # Frozen parameters, not buffers: never optimised, saved by `extra_state` (see notes.py).
        self.memory = nn.Parameter(torch.zeros(c.layers, parts, M, c.hidden),
                                   requires_grad=False)
        self.memory_length = nn.Parameter(torch.zeros(parts), requires_grad=False)
        self.eval_tokens, self.eval_parts = eval_tokens, eval_parts
        self.eval_segments, self.seq_len = eval_segments, seq_len

    def extra_state(self) -> dict[str, Tensor]:
        return {**super().extra_state(), "memory": self.memory.detach(),
                "memory_length": self.memory_length.detach()}

    def units(self, batch: dict[str, Tensor]) -> float:
        return float(batch["targets"].numel())

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("lm_tokens", 0.0), 1e-12)
        return {"loss_lm": sums["lm_loss_sum"] / n, "acc_lm": sums["lm_correct"] / n,
                "memory_filled": sums["memory_filled"] / max(sums["rows"], 1.0)}

    def forward(self, batch: dict[str, Tensor], tokens_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        parts = batch["stream_part"]
        M = self.model.memory
        memory = list(self.memory[:, parts].unbind(0)) if M else None  # per layer (B, M, H)
        length = self.memory_length[parts]
        out = self.model(batch["input_ids"], memory, length)
        loss_sum, stats = lm_terms(out.logits, batch["targets"])
        if M:  # the next segment of these parts reads this one's states
            with torch.no_grad():
                new = next_memory(memory, out.hidden, M)
                self.memory[:, parts] = torch.stack(new).to(self.memory.dtype)
                self.memory_length[parts] = (length + batch["input_ids"].shape[1]).clamp(max=M)
        stats["memory_filled"] = length.sum().float()
        stats["rows"] = length.new_tensor(float(len(parts)))
        return loss_sum / tokens_per_rank, stats

    @torch.no_grad()
    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        if self.eval_tokens is None:
            return None
        with_memory = stream_perplexity(self.model, self.eval_tokens, self.seq_len,
                                        self.eval_parts, self.eval_segments, info.device,
                                        autocast, use_memory=True)
        without = stream_perplexity(self.model, self.eval_tokens, self.seq_len, self.eval_parts,
                                    self.eval_segments, info.device, autocast, use_memory=False)
        return {**with_memory, "loss_no_memory": without["loss"],
                "perplexity_no_memory": without["perplexity"]}


def lm_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed next-token loss of (B, L, vocab) logits against (B, L) targets, and statistics."""
    flat, labels = logits.float().flatten(0, 1), targets.reshape(-1)
    loss_sum = nn.functional.cross_entropy(flat, labels, reduction="sum")
    return loss_sum, {"lm_loss_sum": loss_sum.detach(),
                      "lm_tokens": labels.new_tensor(float(labels.numel())),
                      "lm_correct": (flat.detach().argmax(-1) == labels).sum().float()}


@torch.no_grad()
def stream_perplexity(model: TransformerXLLM, tokens, seq_len: int, parts: int, segments: int,
                      device, autocast, use_memory: bool = True) -> dict[str, float]:
    """Next-token loss over the first `segments` steps of a `parts`-row stream of `tokens`,
    the memory carried from an empty start (or none at all with `use_memory=False`)."""
    was_training = model.training
    model.eval()
    loader = StreamLoader(tokens, seq_len, parts)
    memory, length = None, torch.zeros(parts, device=device)
    loss, correct, count = 0.0, 0.0, 0
    for t in range(min(segments, loader.segments)):
        batch = {k: v.to(device) for k, v in loader.segment(t).items()}
        with autocast:
            out = model(batch["input_ids"], memory, length if memory is not None else None)
        loss_sum, stats = lm_terms(out.logits, batch["targets"])
        loss, correct = loss + float(loss_sum), correct + float(stats["lm_correct"])
        count += batch["targets"].numel()
        if use_memory and model.memory:
            memory = next_memory(memory, out.hidden, model.memory)
            length = (length + seq_len).clamp(max=model.memory)
    model.train(was_training)
    mean = loss / max(count, 1)
    return {"loss": mean, "accuracy": correct / max(count, 1), "tokens": count,
            "perplexity": math.exp(min(mean, 50.0))}


def build_xl_objective(recipe, data: Path, checkpoint_activations: bool = False
                       ) -> TransformerXLPretrainer:
    """The Transformer-XL model (seeded: the same initial weights every run) and objective of
    `recipe` (one stage, checked) with its held-out stream."""
    check_xl_recipe(recipe)
    stage, e = recipe.stages[0], recipe.eval
    held_out, vocab_size = document_stream(data, e.holdout_every, held_out=True)
    config = recipe.model.build(vocab_size)
    check_xl_config(config, recipe.objective.memory)
    if checkpoint_activations:
        raise UserError("transformer-xl does not recompute activations yet; drop "
                        "--checkpoint-activations")
    torch.manual_seed(recipe.seed)
    model = TransformerXLLM(config, recipe.objective.memory)
    parts = max(1, min(e.batch, len(held_out) // (stage.seq_len + 1)))
    return TransformerXLPretrainer(model, stage.global_batch, held_out, parts,
                                   max(e.rows // parts, 1), stage.seq_len)
