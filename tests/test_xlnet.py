"""XLNet (objective.kind xlnet): the content and query masks on a hand-checked permutation,
the two streams through the encoder's own blocks, no leak of a predicted token into its query
stream, partial prediction's count, a run by `fit` whose loss goes down on real encoded data,
its final/ fine-tuned by `motian finetune`, exact resume, and the errors a user can hit."""

from __future__ import annotations

import json
import math

import pytest
import torch

import motian
from motian.cli import main
from motian.errors import UserError
from motian.model import preset
from motian.model.xlnet import (
    XLNetLM,
    prediction_targets,
    sample_order,
    stream_visibility,
    two_stream_visibility,
)
from motian.train.recipe import load_recipe, with_fields
from motian.train.settings import RunSettings
from motian.train.xlnet import permuted
from tests.pretrain_helpers import final_weights, max_difference, run_then_resume, write_recipe

RUN = RunSettings(device="cpu", threads=1, progress=False)
XLNET = "{kind: xlnet, xlnet_k: 6}"
WHOLE_ROWS = "{masking: bert, pair_task: none}"


def rows(text: str) -> list[list[int]]:
    return [[int(c) for c in line.split()] for line in text.strip().splitlines()]


def test_content_sees_at_or_before_query_strictly_before_on_a_hand_checked_order():
    # Positions 0..5, position 5 padding; the order is 0 (CLS), 2, 4, 1, 3.
    rank = torch.tensor([[0, 3, 1, 4, 2, 5]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 0]])
    content, query = (m[0].int().tolist() for m in stream_visibility(rank, pad))
    assert content == rows("""1 0 0 0 0 0
                              1 1 1 0 1 0
                              1 0 1 0 0 0
                              1 1 1 1 1 0
                              1 0 1 0 1 0
                              1 1 1 1 1 0""")
    assert query == rows("""0 0 0 0 0 0
                            1 0 1 0 1 0
                            1 0 0 0 0 0
                            1 1 1 0 1 0
                            1 0 1 0 0 0
                            1 1 1 1 1 0""")
    assert all(query[i][i] == 0 for i in range(6))  # never its own content
    # the two streams side by side: predicted positions 1 and 3 (the last 2 of the order)
    both = two_stream_visibility(rank, pad, torch.tensor([[1, 3]]), torch.tensor([[True, True]]))
    both = both[0].int()
    assert both.shape == (8, 8)
    assert both[:6, :6].tolist() == content and both[6:, :6].tolist() == [query[1], query[3]]
    assert both[:, 6:].sum() == 0  # no row reads the query stream


def tiny_xlnet(position: str, seed: int = 0) -> XLNetLM:
    torch.manual_seed(seed)
    return XLNetLM(preset("tiny", vocab_size=40, hidden=32, heads=4, ffn=64, norm="pre",
                          position=position, dropout=0.0, attention_dropout=0.0,
                          initializer_range=0.3)).eval()


def one_row(seed: int = 0, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (1, length), generator=g)
    ids[0, 0] = 2  # [CLS]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("position", ["rope", "absolute", "alibi", "t5"])
def test_the_query_stream_never_reads_its_own_token_but_reads_earlier_ones(position):
    model = tiny_xlnet(position)
    inputs = permuted(one_row(), 3, torch.Generator().manual_seed(1))
    inputs.pop("mlm_labels")
    rank, positions = inputs["rank"][0], inputs["positions"][0]
    target = int(positions[0])
    base = model.query_stream(**inputs)[0]

    def with_token(at: int, new: int) -> torch.Tensor:
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][0, at] = new
        return model.query_stream(**changed)[0]

    own = inputs["input_ids"][0, target]
    torch.testing.assert_close(with_token(target, int(own) % 30 + 6), base, atol=1e-6, rtol=0)
    earlier = int((rank == rank[target] - 1).nonzero())  # the token just before it in order
    assert earlier != target and not torch.allclose(with_token(earlier, 39), base, atol=1e-4)
    later = int((rank == rank[target] + 1).nonzero()) if rank[target] < 11 else None
    if later is not None:  # a token later in the order is not seen either
        torch.testing.assert_close(with_token(later, 39), base, atol=1e-6, rtol=0)


def test_both_streams_run_the_encoders_own_blocks_and_content_is_the_encoder_alone():
    model = tiny_xlnet("rope")
    inputs = permuted(one_row(3), 4, torch.Generator().manual_seed(2))
    inputs.pop("mlm_labels")
    both = model.query_stream(**inputs, all_layers=True)  # (1, L + P, hidden)
    content, _ = stream_visibility(inputs["rank"], inputs["attention_mask"])
    alone = model.backbone(inputs["input_ids"], content)
    torch.testing.assert_close(both[:, :12], alone, atol=1e-5, rtol=0)
    # the last layer at the predicted rows only equals the full two-stream output there
    torch.testing.assert_close(model.query_stream(**inputs), both[0, 12:][inputs["valid"][0]],
                               atol=1e-5, rtol=0)
    names = {n for n, _ in model.named_parameters()}
    assert names - {n for n in names if n.startswith(("backbone.", "mlm."))} == {"query_init"}


@pytest.mark.parametrize("k", [2, 6, 7])
def test_partial_prediction_predicts_the_last_ceil_n_over_k_of_each_order(k):
    mask = torch.ones(64, 40, dtype=torch.long)
    for row, length in enumerate(torch.randint(2, 41, (64,), generator=torch.Generator()
                                               .manual_seed(k))):
        mask[row, int(length):] = 0
    rank = sample_order(mask, torch.Generator().manual_seed(0))
    positions, valid = prediction_targets(rank, mask, k)
    for b in range(64):
        n = int(mask[b].sum()) - 1  # tokens after [CLS]
        chosen = positions[b][valid[b]]
        assert len(chosen) == math.ceil(n / k)
        assert sorted(rank[b, chosen].tolist()) == list(range(n - len(chosen) + 1, n + 1))
        assert 0 not in chosen.tolist() and bool(mask[b, chosen].all())
    assert int(rank[:, 0].max()) == 0  # [CLS] first in every order
    # the order is uniform: position 1 is first after [CLS] about 1 / 39 of the time in full rows
    full = torch.ones(20_000, 40, dtype=torch.long)
    first = (sample_order(full, torch.Generator().manual_seed(1)) == 1).float().mean(0)[1:]
    assert float((first - 1 / 39).abs().max()) < 0.01


def test_a_tiny_xlnet_recipe_trains_by_fit_and_its_loss_goes_down(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=40, checkpoint_every=0, eval_every=0, optim="adamw",
                          data=WHOLE_ROWS, objective=XLNET)
    run = tmp_path / "run"
    summary = motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=run, run=RUN,
                              override=["optim.lr=0.003"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_plm"] for r in records if "loss_plm" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    assert summary["eval"]["tokens"] > 0 and 0 <= summary["eval"]["accuracy"] <= 1
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["head"] == "XLNetLM" and config["model"]["causal"] is False
    # held out: well below a uniform guess over the vocabulary
    assert summary["eval"]["loss"] < math.log(config["model"]["vocab_size"]) - 0.5
    # final/ is an ordinary encoder for `motian finetune` (the content stream, no permutation)
    ft = tmp_path / "ft"
    assert main(["finetune", "--task", "reviews-sentiment", "--model", str(run / "final"),
                 "--out", str(ft), "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                 "--max-train", "16", "--max-eval", "8", "--max-length", "32",
                 "--no-save-model", "--no-progress", "--threads", "1"]) == 0
    result = json.loads((ft / "results.json").read_text("utf-8"))
    assert result["model"]["source"] == f"motian checkpoint {run / 'final'}"
    assert result["runs"][0]["steps"] == 2


def test_xlnet_resume_from_a_checkpoint_equals_an_uninterrupted_run(pd98_encoded, tmp_path):
    from motian.train.recipe import load_recipe as load

    path = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0, optim="adamw",
                        data=WHOLE_ROWS, objective=XLNET)
    full, resumed = run_then_resume(load(path), RUN, pd98_encoded, tmp_path, step=4)
    assert max_difference(final_weights(resumed), final_weights(full)) <= 1e-6


def test_bad_xlnet_settings_name_their_field(pd98_encoded, tmp_path):
    recipe = load_recipe("xlnet-demo")
    assert (recipe.objective.kind, recipe.objective.xlnet_k) == ("xlnet", 6)
    with pytest.raises(UserError, match=r"objective.xlnet_k must be an integer >= 2.*got 1"):
        with_fields(recipe, ["objective.xlnet_k=1"])
    with pytest.raises(UserError, match=r"objective.xlnet_k must be an integer.*got 6.5"):
        with_fields(recipe, ["objective.xlnet_k=6.5"])
    with pytest.raises(UserError, match="xlnet trains no pair task; set data.pair_task: none"):
        motian.pretrain(recipe="xlnet-demo", data=pd98_encoded, out=tmp_path / "x", steps=1,
                        override=["data.pair_task=sop", "eval.every=0", "eval.rows=16",
                                  "eval.batch=8"], run=RUN)
    with pytest.raises(UserError, match="nothing is masked, so there is nothing for inspect"):
        motian.inspect_batch(data=pd98_encoded, recipe="xlnet-demo")
    with pytest.raises(UserError, match="XLNet: the permutation masks replace causality"):
        XLNetLM(preset("tiny", causal=True))
    # xlnet_k is part of what is trained only for xlnet: other recipes hash as before
    assert with_fields(load_recipe("demo"), ["objective.xlnet_k=7"]).fingerprint() == \
        load_recipe("demo").fingerprint()
    assert with_fields(recipe, ["objective.xlnet_k=7"]).fingerprint() != recipe.fingerprint()
