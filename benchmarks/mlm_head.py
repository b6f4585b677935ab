"""Time one MLM training step (forward + backward) with the output layer computed everywhere vs
only at the masked positions, beside Hugging Face `BertForMaskedLM` of the same shape.

    .venv/bin/python benchmarks/mlm_head.py                # tiny shape, vocab 8000 and 21128
    .venv/bin/python benchmarks/mlm_head.py --batch 16 --length 128 --steps 10

All three models have identical weights shapes (motian imports nothing here; each is built fresh)
and see the same batch with 15% of positions masked. Prints ms per step (median) and ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from motian.model import MaskedLM, preset


def time_steps(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each step. The variants run interleaved (A B C A B C ...) so
    that load from other processes on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_steps(vocab: int, batch: int, length: int, device: str) -> dict:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=vocab, max_positions=max(512, length))
    ours = MaskedLM(cfg).to(device).train()
    hf = BertForMaskedLM(BertConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
        max_position_embeddings=cfg.max_positions, attn_implementation="sdpa")).to(device).train()
    x = torch.randint(5, vocab, (batch, length), device=device)
    masked = torch.rand(batch, length, device=device) < 0.15
    labels = torch.where(masked, x, -100)  # HF form
    positions = masked.view(-1).nonzero().squeeze(1)  # compact form
    targets = x.view(-1)[positions]

    def full():  # motian, output layer at every position (what BERT does)
        logits = ours(x).logits  # (B, L, vocab)
        F.cross_entropy(logits.view(-1, vocab), labels.view(-1)).backward()

    def masked_only():  # motian, output layer at the ~15% masked positions only
        ours(x, mlm_positions=positions, mlm_labels=targets).loss.backward()

    def peer():
        hf(input_ids=x, labels=labels).loss.backward()

    return {"hf BertForMaskedLM": peer, "motian full output": full,
            "motian masked-only": masked_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8000, 21128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}; tiny shape (hidden 64, 2 layers, "
          f"4 heads, ffn 256), batch {args.batch} x {args.length}, fp32")
    for vocab in args.vocab:
        steps = make_steps(vocab, args.batch, args.length, args.device)
        results = time_steps(steps, args.steps, args.warmup)
        peer = results["hf BertForMaskedLM"]
        full, masked = results["motian full output"], results["motian masked-only"]
        print(f"\nvocab {vocab}")
        for name, seconds in results.items():
            print(f"  {name:22s} {seconds * 1e3:9.1f} ms/step   {peer / seconds:5.2f}x vs hf")
        print(f"  output layer share of a full step: ~{1 - masked / full:.0%} "
              f"(masked-only is {full / masked:.2f}x faster than full)")


if __name__ == "__main__":
    main()
