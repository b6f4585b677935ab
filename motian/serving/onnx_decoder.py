"""A decoder's ONNX graph with a KV cache (`decoder_kv.onnx`, written by `motian export` beside
model.onnx for a `CausalLM`), so an ONNX runtime decodes one new token per step, as
`motian generate` does, instead of re-running the whole sequence.

| | name | shape | type |
|---|---|---|---|
| in | input_ids | (B, L): the tokens not read yet (the prompt, then one per step) | int64 |
| in | attention_mask | (B, T + L): 1 = real token, over everything read so far and the new tokens | int64 |
| in | past_key_{i}, past_value_{i} | (B, heads, T, head_dim) per layer i; T = 0 on the first call | float32 |
| out | logits | (B, L, vocab) | float32 |
| out | present_key_{i}, present_value_{i} | (B, heads, T + L, head_dim): the next call's past | float32 |

A batch of prompts is left-padded (0 in the mask), as `motian generate` pads it; positions
count real tokens only and are computed inside the graph from the mask, so the caller keeps
nothing but the mask and the presents. The graph is motian's own cached forward
(`KVCache`, `CausalLM(..., cache=)`) traced once; `check_onnx_decoder` decodes greedily with it
in onnxruntime and compares every step's logits and the tokens with PyTorch's cached decoding.
Every position scheme the cache holds is exported (absolute, sinusoidal, rope, alibi, t5,
nezha); TUPE and DeBERTa, which have no cache, and sliding attention get model.onnx only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from motian.model.transformer import KVCache
from motian.serving.onnx import onnx_session

KV_FILE = "decoder_kv.onnx"


def has_kv_graph(model: nn.Module) -> bool:
    """True for a decoder whose cache an ONNX graph can carry."""
    c = model.config
    return (type(model).__name__ == "CausalLM" and c.attention == "full"
            and c.position not in ("tupe", "deberta"))


def kv_names(layers: int, kind: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (`kind` past or present)."""
    return [f"{kind}_{part}_{i}" for i in range(layers) for part in ("key", "value")]


class _CachedDecoder(nn.Module):
    """(input_ids, attention_mask, *past) -> (logits, *present): the traceable form of one
    cached decoding call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor
                ) -> tuple[Tensor, ...]:
        L = input_ids.shape[1]
        T = attention_mask.shape[1] - L
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)  # real tokens only
        cache = KVCache(len(past) // 2)
        cache.position_ids, cache.attention_mask = positions[:, :T], attention_mask[:, :T]
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        logits = self.model(input_ids, attention_mask[:, T:], positions[:, T:],
                            cache=cache).logits
        return (logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def empty_past(model: nn.Module, batch: int) -> list[np.ndarray]:
    """The past of a first call: (B, heads, 0, head_dim) per layer, keys and values."""
    c = model.config
    return [np.zeros((batch, c.heads, 0, c.head_dim), dtype=np.float32)
            for _ in range(2 * c.layers)]


def export_onnx_decoder(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Trace `model`'s cached forward to `path`, batch, new-token and cache lengths dynamic.
    Traced with a cache already holding 3 columns, 2 new ones and left padding, so the graph
    keeps the general path (a concatenated cache, a padding mask) for every call."""
    model.eval()
    c, layers = model.config, model.config.layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, c.vocab_size, (2, 2), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    past = [torch.randn(2, c.heads, 3, c.head_dim, generator=gen) for _ in range(2 * layers)]
    inputs = ["input_ids", "attention_mask"] + kv_names(layers, "past")
    outputs = ["logits"] + kv_names(layers, "present")
    axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch", 1: "new"}}
    axes |= {n: {0: "batch", 2: "past"} for n in kv_names(layers, "past")}
    axes |= {n: {0: "batch", 2: "total"} for n in kv_names(layers, "present")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: the shape checks, as export_onnx's
        torch.onnx.export(_CachedDecoder(model).eval(), (ids, mask, *past), str(path),
                          dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes)
    model.eval()
    return path


def onnx_greedy(session, model: nn.Module, ids: Tensor, mask: Tensor, new_tokens: int
                ) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy decoding with the graph: the left-padded prompts (B, P) once, then one token per
    step, feeding each call's presents back as the next call's past. Returns the new tokens per
    row and each step's next-token logits (B, vocab)."""
    layers = model.config.layers
    feed_ids, full_mask = ids.numpy(), mask.numpy()
    past = empty_past(model, ids.shape[0])
    chosen, steps = [], []
    for _ in range(new_tokens):
        out = session.run(None, {"input_ids": feed_ids, "attention_mask": full_mask,
                                 **dict(zip(kv_names(layers, "past"), past))})
        logits, past = out[0][:, -1], out[1:]
        steps.append(logits)
        token = logits.argmax(-1)
        chosen.append(token)
        feed_ids = token[:, None].astype(np.int64)
        full_mask = np.concatenate([full_mask, np.ones_like(full_mask[:, :1])], axis=1)
    return np.stack(chosen, 1).tolist(), steps


def check_onnx_decoder(model: nn.Module, path: Path, prompts: list[list[int]], pad_id: int,
                       new_tokens: int = 8) -> dict:
    """Greedy decoding of `prompts` with the graph in onnxruntime against motian's cached
    decoding in PyTorch (`generate_ids`): the largest logit difference over every step, and
    whether every token agrees."""
    from motian.serving.generate import Decoding, generate_ids, left_pad

    ids, mask = left_pad(prompts, pad_id, torch.device("cpu"))
    tokens, steps = onnx_greedy(onnx_session(path), model, ids, mask, new_tokens)
    want = generate_ids(model, prompts, Decoding(max_new_tokens=new_tokens), pad_id,
                        keep_logits=True)
    worst = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(steps, want.logits))
    return {"file": path.name, "steps": new_tokens, "batch": len(prompts),
            "max_abs_diff": {"logits": worst}, "same_tokens": tokens == want.tokens}
