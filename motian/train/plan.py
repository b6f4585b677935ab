"""`motian plan`: will a recipe fit a cluster, at what micro-batch and accumulation, how fast.

Per GPU it adds up what a training step keeps in memory (docs/scale.md derives every term from
the model code and checks the sum against measured peaks, benchmarks/plan_memory.py):

- weights and optimiser, per parameter: fp32 parameters (4 B; under autocast they are the
  master weights, there is no second copy), fp32 gradients (4), DDP's gradient buckets (4,
  several processes only), two fp32 moments for AdamW and LAMB (8), and under bf16/fp16 the
  half-precision copies autocast makes of the weights and autograd keeps for backward (2). The
  optimiser step adds one fp32 temporary per parameter (both optimisers' foreach updates).
- FSDP2 (motian.train.distributed.shard_model): parameters, gradients and moments sharded over
  the N ranks (16 B / N), plus what is gathered at once: the root (embeddings, heads) and two
  blocks (the current one and the prefetched next) in bf16 under FSDP's mixed-precision policy
  (else fp32, and autocast's half copies of every weight as under DDP), one block's unsharded
  fp32 gradient before its reduce-scatter, and, when micro-steps accumulate, the unsharded fp32
  gradients FSDP keeps between them (`set_requires_gradient_sync(False)`: no reduce-scatter
  until the last micro-step).
- activations per micro-batch sequence (`activation_bytes`): what autograd saves in each block,
  the embeddings and the MLM head, with or without recomputation, plus the largest transient
  of the backward pass.

Throughput counts model FLOPs: 6 x (block parameters) per token, 12 x layers x seq_len x hidden
per token for the attention scores (QK^T and AV, forward and backward), and the MLM output
layer at the masked rows; tokens/s = MFU x peak x GPUs / (FLOPs per token).
"""

from __future__ import annotations

import json as json_lib
import math
from dataclasses import asdict, dataclass
from typing import Literal

from motian.errors import UserError
from motian.model.config import ModelConfig

GIB = 1024**3
# Measured on the bundled corpus (People's Daily 1998 + reviews) with the demo tokenizer
# (runs/demo/tokenizer, character-level WordPiece): 1.026 characters and 3.00 UTF-8 bytes per
# token (benchmarks/plan_memory.py --text; docs/scale.md). 1 TB of such text ~ 3.3e11 tokens.
BYTES_PER_TOKEN = 3.0
# Kept free of the plan: the CUDA context, cuBLAS/NCCL workspaces (~1 GiB) and the caching
# allocator's fragmentation (10% of the card).
CONTEXT_GIB = 1.0
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class Gpu:
    """A GPU kind: memory and dense (no sparsity) peak TFLOP/s per precision."""

    name: str
    memory_gib: float
    tflops: dict[str, float]


# NVIDIA data sheets, dense tensor-core peaks (SXM parts); fp32 is without TF32, which
# PyTorch leaves off for matmuls by default. V100 has no bf16.
GPUS: dict[str, Gpu] = {
    "V100-32GB": Gpu("V100-32GB", 32.0, {"fp16": 125.0, "fp32": 15.7}),
    "A100-80GB": Gpu("A100-80GB", 80.0, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    "H100-80GB": Gpu("H100-80GB", 80.0, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
}


def gpu_kind(name: str, memory_gib: float | None = None, tflops: float | None = None,
             precision: str = "bf16") -> Gpu:
    """A built-in kind, or a custom one from `memory_gib` and `tflops` (then `name` is a label)."""
    if memory_gib is not None and tflops is not None:
        return Gpu(name or "custom", memory_gib, {precision: tflops})
    if name not in GPUS:
        raise UserError(f"unknown GPU kind {name!r}; choose one of {', '.join(GPUS)}, or give "
                        "--gpu-memory (GiB) and --gpu-tflops (dense peak) for another kind")
    known = GPUS[name]
    if memory_gib is not None or tflops is not None:  # one number changed on a built-in kind
        return Gpu(name, memory_gib or known.memory_gib,
                   {**known.tflops, **({precision: tflops} if tflops else {})})
    return known


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Widths:
    """Bytes per element of what autograd keeps: `compute` for tensors a matmul saves (2 under
    bf16/fp16 autocast, else 4), `residual` for the residual stream and LayerNorm inputs (fp32:
    the embeddings and the residual adds stay fp32 under autocast)."""

    compute: int = 4
    residual: int = 4


def attention_storage(config: ModelConfig, device: str) -> Literal["fused", "scores", "dropout"]:
    """What attention keeps per layer: "fused" (SDPA's flash / memory-efficient kernels: q, k,
    v, the output and a log-sum-exp per head), "scores" (the (heads, L, L) probabilities: NEZHA,
    or a score bias with learned parameters on CPU, whose SDPA kernel cannot differentiate its
    mask) or "dropout" (motian's explicit CPU path with attention dropout: probabilities,
    their dropout mask and the dropped probabilities)."""
    if config.attention != "full":
        raise UserError(f"plan models full attention; this model has attention="
                        f"{config.attention!r} (its (L, window) scores are not modelled)")
    if config.position == "nezha":
        return "scores"
    if device == "cpu":
        if config.attention_dropout > 0:
            return "dropout"
        if config.position in ("t5", "tupe", "deberta"):
            return "scores"
    return "fused"


def layer_bytes(c: ModelConfig, seq_len: int, w: Widths, storage: str,
                rows: float | None = None) -> float:
    """Bytes one block saves for backward per sequence: all `seq_len` tokens, or with `rows`
    (the last block under `output_positions`) attention at every token and the rest at `rows`.

    Per token, attention part: the block input (LayerNorm input, residual), the normed input the
    qkv projection saves, q, k, v (one (3h) tensor) and the attention output (which the output
    projection reads as a view), plus `storage`'s term. Per row, feed-forward part: the second
    residual (LayerNorm input), its normed copy, the FFN input and the GELU output (GEGLU: the
    two halves, GELU(gate) and the product), and two bool dropout masks when dropout is on."""
    h, e, r, a, s = c.hidden, w.compute, w.residual, c.heads, seq_len
    scores = {"fused": 8 * a, "scores": a * s * e, "dropout": a * s * (2 * e + 1)}[storage]
    attention_part = r * h + 5 * e * h + scores
    ffn = (4 if c.activation == "geglu" else 2) * e * c.ffn
    ffn_part = r * h + e * h + ffn + (2 * h if c.dropout > 0 else 0)
    if rows is None:
        return s * (attention_part + ffn_part)
    return s * attention_part + rows * (ffn_part + e * h)  # + the gathered attention rows


@dataclass(frozen=True)
class Activations:
    """Bytes per micro-batch sequence: `kept` from forward to backward, `transient` the largest
    extra working set of the backward pass."""

    kept: float
    transient: float


def activation_bytes(c: ModelConfig, seq_len: int, w: Widths, storage: str,
                     masked_rate: float, recompute: bool) -> Activations:
    """Activations of one sequence in an MLM step (the head runs at the masked rows only).

    Embeddings: the token and segment ids (int64) and the LayerNorm input; a dropout mask.
    Blocks: `layer_bytes`, the last one at the masked rows (plus [CLS]); with recomputation
    each block keeps only its input and recomputes the rest in backward. Head at N =
    masked_rate x seq_len (+ [CLS]) rows: the final LayerNorm input, the dense input, the GELU
    input, the LayerNorm input (fp32), its normed copy, and the fp32 log-softmax (vocab per row;
    the logits themselves are not kept: the loss keeps only its output)."""
    h, e, r, s, V = c.hidden, w.compute, w.residual, seq_len, c.vocab_size
    rows = masked_rate * s + 1
    embeddings = s * (16 + r * h + (h if c.dropout > 0 else 0))
    head = rows * ((r * h if c.norm == "pre" else 0) + 3 * e * h + 4 * h + 4 * V)
    full = layer_bytes(c, s, w, storage)
    if recompute:
        blocks = c.layers * s * r * h
    else:
        blocks = (c.layers - 1) * full + layer_bytes(c, s, w, storage, rows)
    # Backward: the log-softmax's gradient and its input's (fp32, vocab per row) beside the
    # kept output, or one block's activations at once (recomputed, or its gradients' working
    # set), whichever is larger; they are never alive together.
    transient = max(rows * V * 8, full)
    batch = s * 5 * 8  # the micro-batch itself: ids, mask, segments, positions, documents
    return Activations(embeddings + blocks + head + batch, transient)


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Counts:
    """Parameters of the model an objective trains: all, one block's, the rest (root)."""

    total: int
    block: int
    layers: int

    @property
    def root(self) -> int:
        return self.total - self.layers * self.block


def parameter_counts(config: ModelConfig, objective, pair_task: str) -> Counts:
    """Exact counts from the real model built on the meta device (no memory, no init cost)."""
    import torch

    from motian.train.objectives import build_model

    with torch.device("meta"):
        model = build_model(config, objective, pair_task)
    block = sum(p.numel() for p in model.backbone.blocks[0].parameters())
    return Counts(sum(p.numel() for p in model.parameters()), block, config.layers)


def weight_bytes(n: Counts, parallel: str, world: int, half: bool, accumulating: bool,
                 fsdp_policy: bool) -> tuple[dict[str, float], float]:
    """(bytes per GPU by part during forward/backward, extra bytes during the optimiser step).

    `half`: bf16/fp16 autocast; `fsdp_policy`: FSDP2 gathers bf16 parameters (its
    MixedPrecisionPolicy, bf16 on CUDA) instead of fp32 ones that autocast then copies."""
    P = n.total
    if parallel == "ddp":
        parts = {"parameters": 4 * P, "gradients": 4 * P + (4 * P if world > 1 else 0),
                 "optimizer": 8 * P, "half copies": 2 * P if half else 0}
        return parts, 4 * P
    shard = 1 / world
    gathered = n.root + 2 * n.block
    parts = {"parameters": 4 * P * shard + (2 if fsdp_policy else 4) * gathered,
             "gradients": 4 * P * shard + 4 * n.block + (4 * P if accumulating else 0),
             "optimizer": 8 * P * shard,
             "half copies": 2 * P if half and not fsdp_policy else 0}
    return parts, 4 * P * shard


# --------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    """One stage on one layout (DDP/FSDP, with or without recomputation)."""

    stage: str
    seq_len: int
    parallel: str
    recompute: bool
    weights_gib: dict[str, float]
    activations_per_seq_mib: float
    transient_per_seq_mib: float
    budget_gib: float
    max_micro_batch: int
    max_micro_batch_accumulating: int  # with the gradients a previous micro-step left
    global_batch: int
    micro_batch: int
    accumulation: int
    peak_gib: float
    tokens_per_s: float
    note: str = ""


def peak_bytes(weights: dict[str, float], step_extra: float, act: Activations,
               micro: int) -> float:
    """The step's peak: forward/backward with `micro` sequences, or the optimiser step."""
    static = sum(weights.values())
    return max(static + micro * (act.kept + act.transient) if micro else static,
               static - weights.get("half copies", 0) + step_extra)


def largest_micro_batch(weights: dict[str, float], step_extra: float, act: Activations,
                        budget: float) -> int:
    """The most sequences per micro-batch whose peak stays within `budget` (0: none fit)."""
    if peak_bytes(weights, step_extra, act, 1) > budget:
        return 0
    static = sum(weights.values())
    return int((budget - static) // (act.kept + act.transient))


def flops_per_token(c: ModelConfig, counts: Counts, seq_len: int, masked_rate: float) -> float:
    """Model FLOPs per trained token: 6 x block parameters, 12 L s h attention scores and the
    MLM output layer (hidden x vocab) at the masked rows."""
    return (6 * counts.layers * counts.block + 12 * c.layers * seq_len * c.hidden
            + 6 * masked_rate * c.hidden * c.vocab_size)


def plan_stage(c: ModelConfig, counts: Counts, stage, gpu: Gpu, gpus: int, precision: str,
               parallel: str, recompute: bool, global_batch: int, micro_batch: int,
               mfu: float, masked_rate: float, device: str = "cuda") -> StagePlan:
    half = precision in ("bf16", "fp16")
    w = Widths(compute=2 if half else 4)
    act = activation_bytes(c, stage.seq_len, w, attention_storage(c, device), masked_rate,
                           recompute)
    note = ""
    share = math.ceil(global_batch / gpus)
    if share * gpus != global_batch:
        note = (f"global batch {global_batch} is not divisible by {gpus} GPUs: planned with "
                f"{share * gpus} ({share} per GPU)")
    budget = gpu.memory_gib * GIB * (1 - FRAGMENTATION) - CONTEXT_GIB * GIB
    fits: dict[bool, int] = {}
    for accumulating in (False, True):
        weights, extra = weight_bytes(counts, parallel, gpus, half, accumulating,
                                      fsdp_policy=precision == "bf16")
        fits[accumulating] = largest_micro_batch(weights, extra, act, budget)
    most = fits[False] if fits[False] >= share else fits[True]
    micro = micro_batch or max((d for d in range(1, min(most, share) + 1) if share % d == 0),
                               default=0)
    if micro_batch and share % micro_batch:
        raise UserError(f"micro-batch {micro_batch} does not divide the {share} rows each GPU "
                        f"gets per step (global batch {share * gpus} / {gpus} GPUs)")
    accumulation = share // micro if micro else 0
    weights, extra = weight_bytes(counts, parallel, gpus, half, accumulation > 1,
                                  fsdp_policy=precision == "bf16")
    if micro == 0:
        note = "; ".join(filter(None, [note, "does not fit: not even one sequence per GPU"]))
    elif micro > most:
        note = "; ".join(filter(None, [note, f"micro-batch {micro} exceeds the {most} that fit"]))
    peak = peak_bytes(weights, extra, act, micro)
    # MFU counts model FLOPs; recomputation runs the forward twice (4/3 of the work).
    useful = mfu * (0.75 if recompute else 1.0)
    tokens_per_s = useful * gpu.tflops[precision] * 1e12 * gpus / flops_per_token(
        c, counts, stage.seq_len, masked_rate) if micro else 0.0
    return StagePlan(stage.name or f"L{stage.seq_len}", stage.seq_len, parallel, recompute,
                     {k: v / GIB for k, v in weights.items()}, act.kept / 2**20,
                     act.transient / 2**20, budget / GIB, most, fits[True], share * gpus, micro,
                     accumulation, peak / GIB, tokens_per_s, note)


def plan(recipe: str = "motian-1b", gpu: str = "V100-32GB", gpus: int = 8,
         gpu_memory: float | None = None, gpu_tflops: float | None = None,
         precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
         parallel: Literal["ddp", "fsdp", "both"] = "both",
         recompute: Literal["on", "off", "both"] = "both",
         global_batch: int = 0, micro_batch: int = 0, mfu: float = 0.35,
         tokens: float = 0.0, text_tb: float = 0.0, vocab_size: int = 0,
         json: bool = False) -> dict:
    """Plan a pretraining run on a cluster: memory per GPU, micro-batch, accumulation, days.

    For each stage of the recipe and each layout (DDP or FSDP, with or without activation
    recomputation): the memory per GPU of parameters, gradients, optimiser state and
    activations per sequence, the largest micro-batch that fits (keeping 1 GiB for the CUDA
    context and 10% of the card for fragmentation), the gradient accumulation for the global
    batch, and tokens/s at the given MFU. docs/scale.md derives the memory model and checks it
    against measured peaks.

    Args:
        recipe: a shipped recipe (motian-1b, motian-base, demo, ...) or a YAML file.
        gpu: V100-32GB, A100-80GB or H100-80GB (or a label, with --gpu-memory and --gpu-tflops).
        gpus: GPUs in the cluster (data-parallel processes; with 1, only the ddp rows: one
            process runs without a wrapper, as ddp without its gradient buckets).
        gpu_memory: memory per GPU in GiB (a custom kind, or overriding a built-in one).
        gpu_tflops: dense peak TFLOP/s at the chosen precision (custom kind or override).
        precision: auto (bf16 where the GPU has it, else fp16), bf16, fp16 or fp32.
        parallel: ddp, fsdp or both.
        recompute: activation recomputation on, off or both.
        global_batch: sequences per optimizer step for every stage (0 = each stage's own;
            the Motian report trained at 65536).
        micro_batch: sequences per GPU per forward (0 = the largest that fits and divides).
        mfu: model FLOPs utilisation assumed for tokens/s (model FLOPs, no recomputation).
        tokens: tokens to train on, for the days column (0 = the recipe's steps).
        text_tb: terabytes of text to train on once, at 3.0 bytes per token (the demo
            tokenizer on the bundled Chinese corpus); replaces tokens.
        vocab_size: the tokenizer's vocabulary (0 = the model config's, 21128).
        json: print JSON instead of the table.
    """
    from motian.train.recipe import load_recipe

    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    r = load_recipe(recipe)
    if r.objective.kind not in ("mlm", "causal"):
        raise UserError(f"recipe {r.name}: plan models mlm and causal recipes; objective.kind "
                        f"{r.objective.kind} trains other models beside the encoder")
    kind = gpu_kind(gpu, gpu_memory, gpu_tflops, "bf16" if precision == "auto" else precision)
    if precision == "auto":
        precision = "bf16" if "bf16" in kind.tflops else "fp16"
    if precision not in kind.tflops:
        raise UserError(f"{kind.name} has no {precision} peak listed (it has "
                        f"{', '.join(kind.tflops)}); choose one of those with --precision, "
                        "or give --gpu-tflops")
    config = r.model.build(vocab_size or None)
    counts = parameter_counts(config, r.objective, r.data.pair_task)
    masked = 1.0 if r.objective.kind == "causal" else r.data.masking_config().rate
    if gpus == 1:  # one process: neither wrapper is applied (DDP's terms without buckets)
        parallel = "ddp"
    layouts = [(p, rc) for p in (("ddp", "fsdp") if parallel == "both" else (parallel,))
               for rc in ((False, True) if recompute == "both" else (recompute == "on",))]
    stages = [plan_stage(config, counts, s, kind, gpus, precision, p, rc,
                         global_batch or s.global_batch, micro_batch, mfu, masked)
              for s in r.stages for p, rc in layouts]
    total_tokens = text_tb * 1e12 / BYTES_PER_TOKEN if text_tb else tokens
    if not total_tokens and not r.budget_minutes:
        total_tokens = r.steps * sum(s.fraction * (global_batch or s.global_batch) * s.seq_len
                                     for s in r.stages)
    result = {"recipe": r.name, "gpu": asdict(kind), "gpus": gpus, "precision": precision,
              "parameters": counts.total, "block_parameters": counts.block,
              "mfu": mfu, "tokens": total_tokens,
              "reserve": {"context_gib": CONTEXT_GIB, "fragmentation": FRAGMENTATION},
              "layouts": _layouts(r.stages, stages, total_tokens, gpus, len(layouts)),
              "stages": [asdict(s) for s in stages]}
    if json:
        print(json_lib.dumps(result, indent=2))
    else:
        print_plan(result)
    return result


def _layouts(recipe_stages, plans: list[StagePlan], tokens: float, gpus: int,
             per_stage: int) -> list[dict]:
    """Per layout: one `--micro-batch` for the whole run (`motian pretrain` takes one: the
    largest that fits every stage and divides every stage's rows per GPU), the accumulation it
    gives each stage, and the days for `tokens`, split over the stages as the recipe splits
    its tokens."""
    out = []
    for k in range(per_stage):
        mine = plans[k::per_stage]
        shares = [p.global_batch // gpus for p in mine]
        micro = max((d for d in range(1, max(shares) + 1)
                     if all(n % d == 0 and d <= (p.max_micro_batch if d == n else
                                                 p.max_micro_batch_accumulating)
                            for n, p in zip(shares, mine))), default=0)
        weights = [s.fraction * p.global_batch * s.seq_len for s, p in zip(recipe_stages, mine)]
        seconds = sum(tokens * wt / sum(weights) / p.tokens_per_s if p.tokens_per_s
                      else math.inf for wt, p in zip(weights, mine))
        out.append({"parallel": mine[0].parallel, "recompute": mine[0].recompute,
                    "micro_batch": micro,
                    "accumulation": [n // micro if micro else 0 for n in shares],
                    "days": seconds / 86400 if tokens else None,
                    "fits": all(p.micro_batch for p in mine)})
    return out


def print_plan(result: dict) -> None:
    """The plan as an aligned Markdown table (one row per stage and layout), then the budget,
    the notes and the days per layout."""
    g = result["gpu"]
    print(f"{result['recipe']}: {result['parameters'] / 1e9:.3g}B parameters on "
          f"{result['gpus']} x {g['name']} ({g['memory_gib']:g} GiB, "
          f"{g['tflops'][result['precision']]:g} TFLOP/s {result['precision']}), "
          f"MFU {result['mfu']:g}\n")
    header = ["stage", "layout", "params", "grads", "optim", "half", "act/seq", "fits",
              "micro", "accum", "peak", "tokens/s"]
    rows = []
    for s in result["stages"]:
        w = s["weights_gib"]
        rows.append([f"{s['stage']} ({s['seq_len']})", _layout(s), f"{w['parameters']:.2f}G",
                     f"{w['gradients']:.2f}G", f"{w['optimizer']:.2f}G",
                     f"{w['half copies']:.2f}G", f"{s['activations_per_seq_mib']:.1f}M",
                     str(s["max_micro_batch"]), str(s["micro_batch"]), str(s["accumulation"]),
                     f"{s['peak_gib']:.1f}G", f"{s['tokens_per_s']:,.0f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for k, row in enumerate([header, ["-" * n for n in widths], *rows]):
        cells = [c.ljust(n) if i < 2 or k == 1 else c.rjust(n)
                 for i, (c, n) in enumerate(zip(row, widths))]
        print("| " + " | ".join(cells) + " |")
    print(f"\nbudget per GPU {result['stages'][0]['budget_gib']:.1f} GiB = {g['memory_gib']:g} "
          f"GiB - {FRAGMENTATION:.0%} fragmentation - {CONTEXT_GIB:g} GiB CUDA context; fits = "
          "the largest micro-batch; act/seq = activations kept per sequence; G = GiB, M = MiB")
    notes: dict[str, list[str]] = {}
    for s in result["stages"]:
        for note in filter(None, s["note"].split("; ")):
            notes.setdefault(note, []).append(f"{s['stage']} {_layout(s)}")
    for note, where in notes.items():
        print(f"{note} ({', '.join(where)})")
    print("one run (pretrain --micro-batch)"
          + (f", {result['tokens']:.3g} tokens:" if result["tokens"] else ":"))
    for lay in result["layouts"]:
        if not lay["fits"]:
            print(f"  {_layout(lay)}: does not fit (micro-batch 0): use FSDP, recomputation, "
                  "more or larger GPUs, or a shorter sequence")
            continue
        days = f", {lay['days']:.1f} days" if lay["days"] is not None else ""
        print(f"  {_layout(lay)}: --micro-batch {lay['micro_batch']}, accumulation "
              f"{' / '.join(map(str, lay['accumulation']))}{days}")


def _layout(d: dict) -> str:
    return f"{d['parallel']}{' +recompute' if d['recompute'] else ''}"
