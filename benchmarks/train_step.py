"""One MLM training step (forward + backward + AdamW), motian against Hugging Face
`BertForMaskedLM` of the same shape, alternating in one run (issue 4, item 5).

    .venv/bin/python benchmarks/train_step.py                  # vocab 8000 and 21128
    .venv/bin/python benchmarks/train_step.py --vocab 8000 --steps 6 --compile

Shape: hidden 256, 4 layers, 4 heads, FFN 1024, sequence 128, batch 32, fp32, dropout 0.1 (BERT's
defaults, the same for both), `torch.set_num_threads(2)`. Both models get the same input ids and
the same 15% masked positions. Variants, timed one step each in turn (A B C A B C ...) so that
load from other processes hits all alike; warm-up rounds are not timed:

- `peer stock`: `BertForMaskedLM(input_ids, labels=...)`: output layer at every position;
- `peer masked-only`: the peer's encoder, hidden states gathered at the masked positions, then
  its own `cls` head: the peer with the output-layer saving motian makes (the issue's ~3,440);
- `motian`: `MaskedLM(..., mlm_positions, mlm_labels)`, eager;
- `motian compiled` (with --compile): the same under `torch.compile` (inductor); its first step
  (compilation) is reported separately.

Peak memory: each variant runs again in a fresh subprocess that reads its resident set size
before building the model (VmRSS) and its peak (VmHWM, both from /proc/self/status) after
three steps; not `ru_maxrss`, which Linux carries over from the parent across fork + exec. The difference is what training added: weights, gradients, AdamW state,
activations, allocator slack. (torch has no CPU allocator statistics to read instead: CPU
tensors come straight from malloc.) Fresh processes keep one variant's freed memory from
hiding another's peak.

FLOPs counted per step (matmuls only; fwd = 2 FLOPs per multiply-add, bwd = 2x fwd):
    encoder:   6 * T * layers * (4 h^2 + 2 h ffn)      T = batch * seq tokens
               motian: minus 6 * (T - n) * (h^2 + 2 h ffn) and 12 * (T - n) * seq * h: its
               last block's queries, output projection and FFN run at the n masked rows only
    attention: 12 * T * layers * seq * h               (q k^T and p v, fwd + bwd)
    MLM head:  6 * n * (h^2 + h * vocab)               n = T (stock) or masked count
against this CPU's fp32 matmul rate, a 2048^3 `torch.mm` timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from motian.model import MaskedLM, ModelConfig, preset


@dataclass
class Shape:
    vocab: int
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 1024
    batch: int = 32
    seq: int = 128
    dropout: float = 0.1

    def motian_config(self) -> ModelConfig:
        return preset("tiny", vocab_size=self.vocab, hidden=self.hidden, layers=self.layers,
                      heads=self.heads, ffn=self.ffn, max_positions=512, dropout=self.dropout,
                      attention_dropout=self.dropout)

    def tokens(self) -> int:
        return self.batch * self.seq


def make_batch(shape: Shape) -> dict[str, torch.Tensor]:
    """The same batch for every variant: ids, HF labels (-100 = not masked), compact form."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, shape.vocab, (shape.batch, shape.seq), generator=g)
    masked = torch.rand(shape.batch, shape.seq, generator=g) < 0.15
    positions = masked.view(-1).nonzero().squeeze(1)  # flat indices into batch * seq
    return {"input_ids": x, "labels": torch.where(masked, x, -100), "positions": positions,
            "targets": x.view(-1)[positions]}


def build_step(variant: str, shape: Shape, batch: dict) -> Callable[[], float]:
    """A closure doing one forward + backward + AdamW step of `variant`; returns the loss."""
    torch.manual_seed(0)
    if variant.startswith("peer"):
        from transformers import BertConfig, BertForMaskedLM

        model = BertForMaskedLM(BertConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, intermediate_size=shape.ffn,
            max_position_embeddings=512, hidden_dropout_prob=shape.dropout,
            attention_probs_dropout_prob=shape.dropout, attn_implementation="sdpa"))
    else:
        model = MaskedLM(shape.motian_config())
    model.train()
    # fused=True: what `transformers.Trainer` uses by default with torch >= 2.8 (its
    # "adamw_torch_fused"); the same optimizer for every variant.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    x, labels = batch["input_ids"], batch["labels"]
    positions, targets = batch["positions"], batch["targets"]
    if variant == "motian compiled":
        model = torch.compile(model)

    def loss_of() -> torch.Tensor:
        if variant == "peer stock":
            return model(input_ids=x, labels=labels).loss
        if variant == "peer masked-only":
            h = model.bert(input_ids=x).last_hidden_state  # (B, L, hidden)
            logits = model.cls(h.reshape(-1, shape.hidden)[positions])  # (N, vocab)
            return F.cross_entropy(logits, targets)
        return model(x, mlm_positions=positions, mlm_labels=targets).loss

    def step() -> float:
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 GFLOP/s of an n^3 torch.mm on the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_flops(variant: str, shape: Shape, masked: int) -> float:
    """Matmul FLOPs of one step as `variant` computes it (see the module docstring)."""
    s, T = shape, shape.tokens()
    per_row = 4 * s.hidden**2 + 2 * s.hidden * s.ffn  # q/k/v/out projections + FFN, per token
    encoder = 6 * T * s.layers * per_row
    attention = 12 * T * s.layers * s.seq * s.hidden
    if variant.startswith("motian"):  # its last block: queries, out projection, FFN at n rows
        encoder -= 6 * (T - masked) * (s.hidden**2 + 2 * s.hidden * s.ffn)
        attention -= 12 * (T - masked) * s.seq * s.hidden
    n_out = T if variant == "peer stock" else masked
    return encoder + attention + 6 * n_out * (s.hidden**2 + s.hidden * s.vocab)


def time_alternating(steps: dict[str, Callable[[], float]], rounds: int,
                     warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each variant, one step each in turn; and each variant's first
    (warm-up) step time, which for a compiled model is mostly compilation."""
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - start
            if r == 0:
                first[name] = seconds
            if r >= warmup:
                times[name].append(seconds)
            if not loss == loss:  # NaN: a broken variant must not be timed as fast
                raise RuntimeError(f"{name}: loss is NaN")
    return times, first


def proc_status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(variant: str, shape: Shape, steps: int = 3) -> dict[str, float]:
    """Run in a fresh process: MiB of peak RSS added by building and training `variant`."""
    import transformers  # noqa: F401  (imported before the baseline by every variant alike)

    batch = make_batch(shape)
    before = proc_status_mib("VmRSS")
    step = build_step(variant, shape, batch)
    for _ in range(steps):
        step()
    peak = proc_status_mib("VmHWM")
    return {"before_mib": before, "peak_mib": peak, "added_mib": peak - before}


def memory_in_subprocess(variant: str, vocab: int, compile_steps: int = 3) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-of", variant, "--vocab", str(vocab),
           "--memory-steps", str(compile_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(shape: Shape, times: dict[str, list[float]], first: dict[str, float],
           memory: dict[str, dict], masked: int, peak_gflops: float) -> None:
    T = shape.tokens()
    tps = {name: T / statistics.median(t) for name, t in times.items()}
    print(f"\nvocab {shape.vocab}: {masked} of {T} positions masked; "
          f"matmul peak {peak_gflops:.0f} GFLOP/s")
    print(f"  {'variant':18s} {'tokens/s':>9s} {'spread':>13s} {'GFLOP/s':>8s} {'of peak':>7s} "
          f"{'peak MiB':>9s}")
    for name, t in times.items():
        gflops = step_flops(name, shape, masked) / statistics.median(t) / 1e9
        mem = memory.get(name, {}).get("added_mib", float("nan"))
        print(f"  {name:18s} {tps[name]:9.0f} {T / max(t):6.0f}-{T / min(t):<6.0f} "
              f"{gflops:8.1f} {gflops / peak_gflops:7.0%} {mem:9.0f}")
    base = tps["peer stock"]
    base_mem = memory.get("peer stock", {}).get("added_mib", float("nan"))
    for name in tps:
        if name.startswith("motian"):
            mem = memory.get(name, {}).get("added_mib", float("nan"))
            print(f"  {name} / peer stock: {tps[name] / base:.2f}x tokens/s, "
                  f"{mem / base_mem:.2f}x peak memory; / peer masked-only: "
                  f"{tps[name] / tps['peer masked-only']:.2f}x")
    if "motian compiled" in first:
        print(f"  motian compiled: first step (compilation) {first['motian compiled']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8000, 21128])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add motian under torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:  # child process of memory_in_subprocess
        print(json.dumps(measure_memory(args.memory_of, Shape(args.vocab[0]), args.memory_steps)))
        return
    import transformers

    variants = ["peer stock", "peer masked-only", "motian"] + (["motian compiled"]
                                                              if args.compile else [])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for vocab in args.vocab:
        shape = Shape(vocab)
        batch = make_batch(shape)
        peak = matmul_gflops()
        steps = {name: build_step(name, shape, batch) for name in variants}
        times, first = time_alternating(steps, args.steps, args.warmup)
        del steps
        peak = max(peak, matmul_gflops())
        memory = {} if args.no_memory else {name: memory_in_subprocess(name, vocab)
                                             for name in variants}
        report(shape, times, first, memory, len(batch["positions"]), peak)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
