"""`motian plan`: the memory formula against sums written out by hand for a tiny config, against
a measured peak on this CPU, the CLI's table, a recipe that cannot fit, an unknown GPU kind."""

from __future__ import annotations

import json

import pytest

from motian.cli import main
from motian.errors import UserError
from motian.model import MaskedLM, count_parameters
from motian.model.config import preset
from motian.train.plan import (
    Counts,
    Widths,
    activation_bytes,
    gpu_kind,
    layer_bytes,
    parameter_counts,
    plan,
    weight_bytes,
)
from motian.train.recipe import ObjectiveSpec

TINY = dict(hidden=64, layers=2, heads=4, ffn=256, vocab_size=100, norm="pre",
            position="alibi", dropout=0.0, attention_dropout=0.0)


def test_parameter_counts_are_the_real_models():
    c = preset("tiny", **TINY)
    n = parameter_counts(c, ObjectiveSpec(), "none")
    # block: qkv 64*192+192, out 64*64+64, two LayerNorms 2*128, up 64*256+256, down 256*64+64
    assert n.block == 12480 + 4160 + 256 + 16640 + 16448 == 49984
    # + word 100*64, segments 2*64, embedding LN 128, final LN 128, MLM dense 4160 + LN 128 +
    # output bias 100 (the output weight is the tied word embedding)
    assert n.total == 2 * 49984 + 6400 + 128 + 128 + 128 + 4160 + 128 + 100
    assert n.total == count_parameters(MaskedLM(c))


def test_activation_formula_by_hand():
    c = preset("tiny", **TINY)
    s, h, f, a = 16, 64, 256, 4
    fp32 = Widths()
    # per token, fp32: attention part 4h (block input) + 5*4h (normed input, q k v, output)
    # + 8a (log-sum-exp); FFN part 4h (second residual) + 4h (normed) + 2*4f (GELU in, out)
    per_token = 4 * h + 20 * h + 8 * a + 4 * h + 4 * h + 8 * f
    assert per_token == 4128
    assert layer_bytes(c, s, fp32, "fused") == s * 4128
    # bf16 autocast: matmul inputs 2 bytes, the residual stream 4; the probabilities of a
    # (heads, L, L) attention replace the log-sum-exp
    bf16 = Widths(compute=2)
    assert layer_bytes(c, s, bf16, "scores") == s * (4 * h + 10 * h + a * s * 2 + 4 * h + 2 * h
                                                      + 4 * f)
    # the last block at 3 masked rows: attention everywhere, the rest (+ gathered rows) at 3
    assert layer_bytes(c, s, fp32, "fused", rows=3) == s * (24 * h + 8 * a) + 3 * (
        8 * h + 8 * f + 4 * h)
    rows = 0.25 * s + 1  # masked rows + [CLS]
    head = rows * (4 * h + 3 * 4 * h + 4 * h + 4 * 100)
    embeddings = s * (16 + 4 * h)
    act = activation_bytes(c, s, fp32, "fused", 0.25, recompute=False)
    assert act.kept == pytest.approx(
        embeddings + s * 4128 + layer_bytes(c, s, fp32, "fused", rows) + head + s * 40)
    assert act.transient == s * 4128  # one block's activations > 8 * vocab * rows here
    again = activation_bytes(c, s, fp32, "fused", 0.25, recompute=True)
    assert again.kept == pytest.approx(embeddings + 2 * s * 4 * h + head + s * 40)


def test_weight_bytes_by_hand():
    n = Counts(total=1000, block=100, layers=8)  # root = 200
    ddp, step = weight_bytes(n, "ddp", 4, half=True, accumulating=True, fsdp_policy=False)
    assert ddp == {"parameters": 4000, "gradients": 8000, "optimizer": 8000, "half copies": 2000}
    assert step == 4000
    fsdp, step = weight_bytes(n, "fsdp", 4, half=True, accumulating=False, fsdp_policy=True)
    # 1/4 of 4 B params + bf16 root and two blocks; 1/4 of the grads + one block's fp32 grad
    assert fsdp == {"parameters": 1000 + 2 * 400, "gradients": 1000 + 400, "optimizer": 2000,
                    "half copies": 0}
    assert step == 1000


def test_predicted_peak_is_within_20_percent_of_the_measured_one(pd98_encoded):
    from benchmarks.plan_memory import QUICK, compare

    (without, with_recompute) = compare(QUICK, pd98_encoded)
    for row in (without, with_recompute):
        assert abs(row["error"]) < 0.20, row
    assert with_recompute["measured_mib"] < without["measured_mib"]


def test_cli_prints_the_table_and_json(capsys):
    assert main(["plan", "--recipe", "motian-base", "--gpu", "A100-80GB", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "| stage" in out and "| short (128) | ddp +recompute" in out and "days" in out
    assert main(["plan", "--recipe", "motian-base", "--gpus", "2", "--parallel", "fsdp",
                 "--recompute", "off", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["parallel"] for s in result["stages"]] == ["fsdp", "fsdp"]
    assert result["stages"][0]["micro_batch"] * result["stages"][0]["accumulation"] * 2 == 4096


def test_a_recipe_that_cannot_fit_says_so(capsys):
    result = plan("motian-1b", gpu="small", gpus=1, gpu_memory=8.0, gpu_tflops=50.0,
                  precision="bf16", parallel="ddp")
    assert all(s["micro_batch"] == 0 for s in result["stages"])
    assert not any(lay["fits"] for lay in result["layouts"])
    out = capsys.readouterr().out
    assert "does not fit: not even one sequence per GPU" in out
    assert "does not fit (micro-batch 0): use FSDP" in out


def test_unknown_gpu_kind_and_missing_precision_are_refused():
    with pytest.raises(UserError, match="unknown GPU kind 'T4'.*V100-32GB, A100-80GB, H100-80GB"):
        gpu_kind("T4")
    with pytest.raises(UserError, match="V100-32GB has no bf16"):
        plan("demo", gpu="V100-32GB", precision="bf16")
    assert main(["plan", "--gpu", "T4"]) == 1
