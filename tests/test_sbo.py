"""SpanBERT's span boundary objective (motian.data.spans, motian.model.sbo, motian.train.sbo):
boundaries and offsets on a hand-checked row and on real masked batches, the head's shapes and
loss, an end-to-end run of the shipped recipe through the CLI, exact resume, and the errors
for a recipe that cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from motian import cli
from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.data.spans import span_boundaries
from motian.errors import UserError
from motian.model import from_pretrained, preset
from motian.model.sbo import SpanBoundaryHead, output_embedding
from motian.train.metrics import read_metrics
from motian.train.objectives import TaskWeighting, build_model, predicted_tokens, task_names
from motian.train.recipe import ObjectiveSpec, RunSettings, load_recipe, with_fields
from motian.train.sbo import SpanBoundaryPretrainer
from tests.pretrain_helpers import final_weights, max_difference, run_then_resume, write_recipe

CPU = RunSettings(device="cpu", threads=1, progress=False)
SBO_DATA = "{masking: spanbert, pair_task: none}"
SBO_OBJECTIVE = "{kind: mlm, sbo: true, weighting: fixed}"


def test_boundaries_and_offsets_of_a_hand_checked_batch():
    # Two rows of 8 (column 0 is [CLS]). Row 0 masks columns 2-4 and 6-7 (the second span
    # runs to the row's last column); row 1 masks column 1 and columns 3-4.
    L = 8
    positions = np.array([2, 3, 4, 6, 7, 8 + 1, 8 + 3, 8 + 4])
    got = span_boundaries(positions, L)
    # span 2-4: boundaries 1 and 5. span 6-7: left 5, no token after column 7 in the row, so
    # the nearest in-row position, 7 itself. span 9: boundaries 8 ([CLS]) and 10. span 11-12:
    # boundaries 10 and 13.
    assert got["sbo_left"].tolist() == [1, 1, 1, 5, 5, 8, 10, 10]
    assert got["sbo_right"].tolist() == [5, 5, 5, 7, 7, 10, 13, 13]
    assert got["sbo_offset"].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    # A run that crosses from one row into the next is two spans.
    across = span_boundaries(np.array([6, 7, 9]), L)
    assert across["sbo_right"].tolist() == [7, 7, 10] and across["sbo_left"].tolist() == [5, 5, 8]
    assert all(len(v) == 0 for v in span_boundaries(np.zeros(0, np.int64), L).values())
    with pytest.raises(ValueError, match="increasing"):
        span_boundaries(np.array([3, 2]), L)


def test_the_loader_delivers_boundaries_of_real_span_masking(pd98_encoded):
    config = LoaderConfig(seq_len=48, batch_size=8, seed=2, span_boundaries=True,
                          masking=MaskingConfig.preset("spanbert"))
    arrays, masked = next(PackedLoader(pd98_encoded, config=config).iter_numpy())
    pos, L = masked.mlm_positions, 48
    left, right, offset = arrays["sbo_left"], arrays["sbo_right"], arrays["sbo_offset"]
    chosen = np.zeros(8 * L, bool)
    chosen[pos] = True
    assert len(left) == len(pos) and offset.max() > 2  # spans of several tokens
    assert np.array_equal(left + 1 + offset, pos)  # the token sits offset after the left edge
    assert not chosen[left].any()  # boundaries are tokens the model reads unmasked
    at_edge = right % L == L - 1
    assert not chosen[right[~at_edge]].any() and (right // L == pos // L).all()
    assert (right[~at_edge] > pos[~at_edge]).all()
    # Without the flag the batch stays as it was.
    plain, _ = next(PackedLoader(pd98_encoded, config=LoaderConfig(seq_len=48, batch_size=8,
                                                                    seed=2)).iter_numpy())
    assert "sbo_left" not in plain


def _tiny_objective(pair_task: str = "none"):
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=3100, hidden=32, heads=2, ffn=64, layers=2, dropout=0.0,
                    attention_dropout=0.0, max_positions=64)
    spec = ObjectiveSpec(sbo=True, weighting="fixed")
    model = build_model(config, spec, pair_task)
    return SpanBoundaryPretrainer(model, TaskWeighting(task_names(spec, pair_task), spec),
                                  max_span=8)


@pytest.mark.parametrize("pair_task", ["none", "sop"])
def test_the_sbo_head_and_loss(pd98_encoded, pair_task):
    head = SpanBoundaryHead(preset("tiny", vocab_size=100, hidden=32, heads=2, ffn=64), 4)
    y = head(torch.randn(5, 32), torch.randn(5, 32), torch.tensor([0, 1, 2, 3, 9]))
    assert y.shape == (5, 32)
    assert head.logits(y, torch.randn(100, 32)).shape == (5, 100)

    pre = _tiny_objective(pair_task)
    config = LoaderConfig(seq_len=48, batch_size=4, seed=1, span_boundaries=True,
                          pair_task=pair_task, masking=MaskingConfig.preset("spanbert"))
    batch = next(iter(PackedLoader(pd98_encoded, config=config)))
    n = predicted_tokens(batch)
    loss, stats = pre(batch, n, 1)
    assert stats["sbo_tokens"] == stats["mlm_tokens"] == n
    # The SBO term by hand, from the full last layer: 1:1 fixed weights sum the two means.
    model = pre.model
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    h = model.encode(**inputs).reshape(-1, 32)
    y = pre.sbo(h[batch["sbo_left"]], h[batch["sbo_right"]], batch["sbo_offset"])
    sbo = F.cross_entropy(pre.sbo.logits(y, output_embedding(model)), batch["mlm_labels"])
    assert float(stats["sbo_loss_sum"]) / n == pytest.approx(sbo.item(), rel=1e-5)
    expected = (float(stats["mlm_loss_sum"]) + float(stats["sbo_loss_sum"])) / n
    if pair_task != "none":
        assert "pair" in pre.weighting.tasks
    else:
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert pre.sbo.dense1.weight.grad.abs().sum() > 0
    assert pre.sbo.position.weight.grad[:4].abs().sum() > 0
    values = pre.summarise({k: float(v) for k, v in stats.items()})
    assert values["loss_sbo"] == pytest.approx(sbo.item(), rel=1e-5) and 0 <= values["acc_sbo"]


def test_spanbert_demo_through_the_cli_trains_sbo_and_saves_a_plain_model(pd98_encoded,
                                                                          tmp_path):
    out = tmp_path / "run"
    code = cli.main([
        "pretrain", "--recipe", "spanbert-demo", "--data", str(pd98_encoded), "--out", str(out),
        "--steps", "6", "--device", "cpu", "--threads", "1", "--no-progress", "--override",
        "model.overrides={hidden: 32, layers: 2, heads: 2, ffn: 64, norm: pre, position: alibi,"
        " max_positions: 64}", "stages=[{fraction: 1.0, seq_len: 32, global_batch: 8}]",
        "eval.every=0", "eval.rows=16", "eval.batch=16", "eval.seq_len=32",
        "checkpoint_every=0"])
    assert code == 0
    train = read_metrics(out / "metrics.jsonl", "train")
    last = train[-1]
    assert last["step"] == 6 and last["loss_sbo"] > 0 and 0 <= last["acc_sbo"] <= 1
    assert "loss_mlm" in last and "weight_sbo" in last
    model = from_pretrained(out / "final")
    assert type(model).__name__ == "MaskedLM"
    assert not any("sbo" in k for k in final_weights(out))
    extra = load_file(str(out / "checkpoints" / "step-00000006" / "objective.safetensors"))
    assert {"sbo.dense1.weight", "sbo.position.weight", "sbo.bias"} <= set(extra)


def test_resume_continues_exactly(pd98_encoded, tmp_path, capsys):
    recipe = load_recipe(write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0,
                                      optim="adamw", data=SBO_DATA, objective=SBO_OBJECTIVE))
    # A run that stopped after its step-4 checkpoint, resumed.
    run_then_resume(recipe, CPU, pd98_encoded, tmp_path, step=4)
    assert "resumed from" in capsys.readouterr().err
    assert max_difference(final_weights(tmp_path / "resumed"),
                          final_weights(tmp_path / "full")) == 0.0
    head = [load_file(str(d / "checkpoints" / "step-00000008" / "objective.safetensors"))
            for d in (tmp_path / "full", tmp_path / "resumed")]
    assert max_difference(*head) == 0.0


def test_recipes_that_cannot_work_are_refused_naming_the_field(tmp_path):
    with pytest.raises(UserError, match="objective.sbo .*span masking.*data.masking"):
        load_recipe(write_recipe(tmp_path, pair_task="none", objective=SBO_OBJECTIVE))
    demo = load_recipe("spanbert-demo")
    with pytest.raises(UserError, match="objective.sbo_max_span"):
        with_fields(demo, ["objective.sbo_max_span=0"])
    with pytest.raises(UserError, match="objective.sbo .*objective.kind: mlm"):
        with_fields(demo, ["objective.kind=causal"])
    with pytest.raises(UserError, match="objective.sbo and objective.notes"):
        with_fields(demo, ["objective.notes=true"])
    # Turning SBO off leaves the fingerprint of a recipe that never had it.
    assert with_fields(demo, ["objective.sbo=false", "objective.sbo_max_span=5"]).fingerprint() \
        == with_fields(demo, ["objective.sbo=false"]).fingerprint()
