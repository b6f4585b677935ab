"""Transformer-XL (motian.model.xl, motian.train.xl, motian.data.stream): the recurrence equals
one forward under the memory-span mask, no gradient reaches the memory, the stream loader's
rows continue their part, and pretraining runs, evaluates with and without memory and resumes
exactly, memory included."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from motian.data.stream import StreamLoader, document_stream
from motian.errors import UserError
from motian.model.config import ModelConfig
from motian.model.xl import TransformerXLLM, next_memory, xl_visibility
from motian.pretraining import pretrain
from motian.train.checkpoint import CHECKPOINTS, LATEST, checkpoint_name
from motian.train.settings import RunSettings
from tests.pretrain_helpers import final_weights, max_difference

CONFIG = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=2, ffn=64, causal=True,
                     position="sinusoidal", norm="pre", dropout=0.0, attention_dropout=0.0)


def model(memory: int, **overrides) -> TransformerXLLM:
    torch.manual_seed(0)
    return TransformerXLLM(CONFIG.replace(**overrides), memory).eval()


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_empty_memory_equals_a_plain_forward(norm):
    m = model(8, norm=norm)
    ids = torch.randint(0, 50, (2, 6))
    empty = [torch.randn(2, 8, 32) for _ in range(2)]  # garbage that must be masked away
    with torch.no_grad():
        plain = m(ids).logits
        masked = m(ids, empty, torch.zeros(2)).logits
    assert torch.allclose(plain, masked, atol=1e-5)


@pytest.mark.parametrize("memory", [6, 3])
def test_segment_two_with_memory_equals_one_forward_under_the_span_mask(memory):
    """The defining property (Dai et al. 2019, section 3.2): reading segment 2 with the memory
    of segment 1 equals positions L..2L-1 of one forward over both segments where each query
    of segment s sees the causal past back to M tokens before its segment's start."""
    m, L = model(memory), 6
    ids = torch.randint(0, 50, (2, 2 * L))
    with torch.no_grad():
        first = m(ids[:, :L])
        mem = next_memory(None, first.hidden, memory)
        second = m(ids[:, L:], mem, torch.full((2,), float(memory))).logits
        i = torch.arange(2 * L)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] >= (i[:, None] // L) * L - memory)
        whole = m(ids, allowed=allowed[None]).logits
    assert torch.allclose(first.logits, whole[:, :L], atol=1e-5)
    assert torch.allclose(second, whole[:, L:], atol=1e-5)


def test_no_gradient_reaches_the_memory():
    m = model(4)
    ids = torch.randint(0, 50, (1, 4))
    first = m(ids)
    mem = next_memory(None, first.hidden, 4)
    assert all(not t.requires_grad for t in mem)
    leaf = [t.clone().requires_grad_(True) for t in mem]
    m(ids, [x.detach() for x in leaf], torch.full((1,), 4.0)).logits.sum().backward()
    assert all(x.grad is None for x in leaf)
    assert m.u.grad is not None and m.blocks[0].attention.position.weight.grad is not None


def test_visibility_masks_empty_memory_slots():
    allowed = xl_visibility(1, 2, 3, torch.tensor([1]), torch.device("cpu"))[0]
    # query 0 sees the one real memory slot (2) and itself (3); query 1 also key 4
    assert allowed.tolist() == [[False, False, True, True, False],
                                [False, False, True, True, True]]


def test_stream_rows_continue_their_part_across_steps():
    tokens = np.arange(100)  # 4 parts of 25 tokens; segments of 4 (+1 target): 6 per part
    loader = StreamLoader(tokens, seq_len=4, parts=4, micro=2)
    it = iter(loader)
    step0 = [next(it), next(it)]  # one step = two micro-batches of 2 parts
    step1 = [next(it), next(it)]
    assert step0[0]["input_ids"].tolist() == [[0, 1, 2, 3], [25, 26, 27, 28]]
    assert step0[0]["targets"].tolist() == [[1, 2, 3, 4], [26, 27, 28, 29]]
    assert step0[1]["input_ids"].tolist() == [[50, 51, 52, 53], [75, 76, 77, 78]]
    assert step0[1]["stream_part"].tolist() == [2, 3]
    assert step1[0]["input_ids"].tolist() == [[4, 5, 6, 7], [29, 30, 31, 32]]
    assert step1[1]["input_ids"].tolist() == [[54, 55, 56, 57], [79, 80, 81, 82]]
    assert loader.segments == 6
    state = loader.state_dict()
    again = StreamLoader(tokens, seq_len=4, parts=4, micro=4)  # another micro-batch resumes
    again.load_state_dict(state)
    assert next(iter(again))["input_ids"][:, 0].tolist() == [8, 33, 58, 83]


def test_document_stream_ends_every_document_with_sep(pd98_encoded):
    tokens, vocab_size = document_stream(pd98_encoded, 10, held_out=True)
    vocab = (pd98_encoded / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tokens[-1] == vocab.index("[SEP]") and vocab_size == len(vocab)


XL = """\
model:
  preset: tiny
  overrides: {{hidden: 32, layers: 2, heads: 2, ffn: 64, norm: pre, position: sinusoidal,
              causal: true, dropout: 0.1, attention_dropout: 0.0}}
data: {{cross_document_attention: true, pair_task: none, masking: bert}}
objective: {{kind: transformer-xl, memory: {memory}}}
optim: {{name: adamw, lr: 0.003}}
stages:
  - {{fraction: 1.0, seq_len: 16, global_batch: 4, warmup: 0.1}}
steps: {steps}
eval: {{every: {steps}, rows: 16, batch: 4}}
checkpoint_every: 3
"""


def write_xl(directory, memory=16, steps=6):
    path = directory / "xl.yaml"
    path.write_text(XL.format(memory=memory, steps=steps), encoding="utf-8")
    return path


def run(recipe, data, out, **kw):
    return pretrain(str(recipe), data, out, run=RunSettings(device="cpu", threads=1,
                                                            progress=False, micro_batch=2), **kw)


def test_pretrain_evaluates_with_and_without_memory_and_resumes_exactly(pd98_encoded,
                                                                         tmp_path):
    recipe = write_xl(tmp_path)
    full = run(recipe, pd98_encoded, tmp_path / "full")
    e = full["eval"]
    assert {"perplexity", "perplexity_no_memory"} <= set(e) and e["tokens"] > 0
    assert e["loss"] != e["loss_no_memory"]
    saved = load_file(str(tmp_path / "full" / CHECKPOINTS / checkpoint_name(3) / "objective.safetensors"))
    assert saved["memory"].shape == (2, 4, 16, 32) and saved["memory_length"].tolist() == [16] * 4
    # An interrupted run: only the step-3 checkpoint, then --resume.
    cut = tmp_path / "cut" / CHECKPOINTS
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / CHECKPOINTS / checkpoint_name(3), cut / checkpoint_name(3))
    (cut / LATEST).write_text(checkpoint_name(3) + "\n", encoding="utf-8")
    run(recipe, pd98_encoded, tmp_path / "cut", resume=True)
    assert max_difference(final_weights(tmp_path / "cut"), final_weights(tmp_path / "full")) == 0
    end = lambda r: load_file(str(r / CHECKPOINTS / checkpoint_name(6) / "objective.safetensors"))  # noqa
    assert torch.equal(end(tmp_path / "cut")["memory"], end(tmp_path / "full")["memory"])
    # final/ is an ordinary model directory: from_pretrained rebuilds the XL model by its name.
    from motian.model.io import from_pretrained
    final = from_pretrained(tmp_path / "full" / "final")
    assert type(final).__name__ == "TransformerXLLM" and final.memory == 16


def test_resume_without_the_memory_would_differ(pd98_encoded, tmp_path):
    """The memory matters: zeroing it in the checkpoint changes the resumed run (5 steps: the
    last step's learning rate is 0 under linear decay, so step 4 must be trained too)."""
    recipe = write_xl(tmp_path, steps=5)
    run(recipe, pd98_encoded, tmp_path / "full")
    cut = tmp_path / "cut" / CHECKPOINTS
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / CHECKPOINTS / checkpoint_name(3), cut / checkpoint_name(3))
    (cut / LATEST).write_text(checkpoint_name(3) + "\n", encoding="utf-8")
    from safetensors.torch import save_file

    extra = load_file(str(cut / checkpoint_name(3) / "objective.safetensors"))
    extra["memory_length"] = torch.zeros_like(extra["memory_length"])
    save_file(extra, str(cut / checkpoint_name(3) / "objective.safetensors"))
    run(recipe, pd98_encoded, tmp_path / "cut", resume=True)
    assert max_difference(final_weights(tmp_path / "cut"), final_weights(tmp_path / "full")) > 0


def test_bad_settings_are_refused(pd98_encoded, tmp_path):
    with pytest.raises(UserError, match="memory must be an integer >= 0"):
        run(write_xl(tmp_path, memory=-1), pd98_encoded, tmp_path / "a")
    with pytest.raises(UserError, match="must be causal"):
        TransformerXLLM(CONFIG.replace(causal=False), 4)
    with pytest.raises(UserError, match="position: sinusoidal"):
        TransformerXLLM(CONFIG.replace(position="alibi"), 4)
    shuffled = tmp_path / "shuffled.yaml"
    shuffled.write_text(write_xl(tmp_path).read_text(encoding="utf-8").replace(
        "kind: transformer-xl", "kind: causal"), encoding="utf-8")
    with pytest.raises(UserError, match="shuffled packed rows"):
        run(shuffled, pd98_encoded, tmp_path / "b")
    packed = tmp_path / "packed.yaml"
    packed.write_text(write_xl(tmp_path).read_text(encoding="utf-8").replace(
        "cross_document_attention: true", "cross_document_attention: false"), encoding="utf-8")
    with pytest.raises(UserError, match="contiguous token stream"):
        run(packed, pd98_encoded, tmp_path / "c")
