"""ELMo (objective.kind elmo): the forward LM never sees later tokens nor the backward LM earlier
ones (nor padding), the loss against a hand computation, a run by `fit` whose loss goes down on
real encoded data, final/ loading back to identical outputs, feature-based `motian finetune`
keeping the biLM frozen while the scalar mix learns, and the errors a user can hit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import motian
from motian.cli import main
from motian.data.splits import next_token_labels
from motian.errors import UserError
from motian.model import from_pretrained, preset, save_pretrained
from motian.model.elmo import ElmoLM, elmo_task_head
from motian.train.elmo import BiLMObjective
from motian.train.recipe import load_recipe
from motian.train.settings import RunSettings
from tests.pretrain_helpers import write_recipe

RUN = RunSettings(device="cpu", threads=1, progress=False)
ELMO = "{kind: elmo}"
WHOLE_ROWS = "{masking: bert, pair_task: none}"


def tiny_lm(seed: int = 0) -> ElmoLM:
    torch.manual_seed(seed)
    return ElmoLM(preset("tiny", vocab_size=40, hidden=16, ffn=24, layers=2)).eval()


def directions(model: ElmoLM, ids: torch.Tensor, mask: torch.Tensor):
    with torch.no_grad():
        _, fwd, bwd = model.backbone(ids, mask)
    return fwd, bwd


def test_forward_lm_sees_no_later_token_and_backward_lm_no_earlier_one():
    model = tiny_lm()
    ids = torch.randint(5, 40, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # row 1: 7 real tokens, then padding
    fwd, bwd = directions(model, ids, mask)
    for row, k in ((0, 4), (1, 3)):
        changed = ids.clone()
        changed[row, k] = (ids[row, k] - 5 + 1) % 35 + 5
        f2, b2 = directions(model, changed, mask)
        for layer in range(2):
            assert torch.equal(f2[layer][row, :k], fwd[layer][row, :k])  # before k: unchanged
            assert not torch.allclose(f2[layer][row, k], fwd[layer][row, k])
            real = int(mask[row].sum())
            assert torch.equal(b2[layer][row, k + 1:real], bwd[layer][row, k + 1:real])
            assert not torch.allclose(b2[layer][row, k], bwd[layer][row, k])
        assert torch.equal(f2[1][1 - row], fwd[1][1 - row])  # the other row untouched
    padded = ids.clone()
    padded[1, 7:] = 3  # other padding tokens: no real position of either direction moves
    f2, b2 = directions(model, padded, mask)
    assert torch.equal(f2[1][1, :7], fwd[1][1, :7]) and torch.equal(b2[1][1, :7], bwd[1][1, :7])


def test_loss_equals_a_hand_computation_with_a_document_boundary_and_padding():
    model = tiny_lm(1)
    ids = torch.tensor([[2, 11, 12, 3, 21, 22, 23, 3], [2, 31, 32, 33, 3, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0] * 8])
    labels = next_token_labels(ids, mask, docs)
    out = model(ids, mask, labels=labels)
    fwd, bwd = directions(model, ids, mask)
    expected, pairs = 0.0, 0
    for r in range(2):
        for t in range(8):
            for s, h in ((t + 1, fwd[1]), (t - 1, bwd[1])):  # the token each direction predicts
                if 0 <= s < 8 and mask[r, t] and mask[r, s] and docs[r, s] == docs[r, t]:
                    logits = (h[r, t] @ model.backbone.embeddings.word.weight.T
                              + model.bias).detach()
                    expected += float(F.cross_entropy(logits[None], ids[r, s][None]))
                    pairs += 1
    assert pairs == 2 * (7 - 1 + 4)  # row 0: 7 real pairs less the boundary, row 1: 4; x2
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    objective = BiLMObjective(model)
    assert objective.units({"labels": labels}) == pairs
    loss, stats = objective({"input_ids": ids, "attention_mask": mask, "labels": labels},
                            float(pairs), 1)
    assert float(loss) == pytest.approx(expected / pairs, rel=1e-5)
    summary = objective.summarise({k: float(v) for k, v in stats.items()})
    assert summary["loss"] == pytest.approx(expected / pairs, rel=1e-5)
    assert summary["perplexity_forward"] == pytest.approx(math.exp(summary["loss_forward"]))


def test_save_load_roundtrip_gives_identical_outputs(tmp_path):
    model = tiny_lm(2)
    ids = torch.randint(5, 40, (2, 9))
    mask = torch.ones_like(ids)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m")).eval()
    assert isinstance(loaded, ElmoLM)
    a, b = model(ids, mask, return_logits=True), loaded(ids, mask, return_logits=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden_states, b.hidden_states)


def test_elmo_recipe_trains_by_fit_then_finetunes_feature_based_with_the_bilm_frozen(
        pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=40, checkpoint_every=0, eval_every=0, optim="adamw",
                          data=WHOLE_ROWS, objective=ELMO)
    run = tmp_path / "run"
    summary = motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=run, run=RUN,
                              override=["optim.lr=0.01"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["loss_forward"], r["loss_backward"]) for r in records if "loss_forward" in r]
    assert len(losses) >= 3, records
    assert losses[-1][0] < losses[0][0] - 0.5 and losses[-1][1] < losses[0][1] - 0.5, losses
    e = summary["eval"]
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["head"] == "ElmoLM"
    assert e["tokens"] > 0 and e["loss_forward"] < math.log(config["model"]["vocab_size"]) - 0.5
    assert e["loss"] == pytest.approx((e["loss_forward"] + e["loss_backward"]) / 2)
    # final/ loads back as the trained LM
    assert isinstance(from_pretrained(run / "final"), ElmoLM)

    ft = tmp_path / "ft"
    assert main(["finetune", "--task", "pd98-ner", "--model", str(run / "final"),
                 "--out", str(ft), "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                 "--max-train", "16", "--max-eval", "8", "--max-length", "32",
                 "--no-progress", "--threads", "1"]) == 0
    result = json.loads((ft / "results.json").read_text("utf-8"))
    assert result["runs"][0]["steps"] == 2
    pretrained = load_file(str(run / "final" / "model.safetensors"))
    tuned_dir = next(p.parent for p in ft.rglob("config.json")
                     if json.loads(p.read_text())["head"] == "ElmoTokenTagger")
    tuned = load_file(str(tuned_dir / "model.safetensors"))
    backbone = [k for k in pretrained if k.startswith("backbone.")]
    assert backbone and all(torch.equal(tuned[k], pretrained[k]) for k in backbone)
    assert not torch.equal(tuned["mix.scalars"], torch.zeros_like(tuned["mix.scalars"]))
    assert float(tuned["mix.gamma"]) != 1.0


def test_bad_elmo_settings_name_their_field(pd98_encoded, tmp_path):
    recipe = load_recipe("elmo-demo")
    assert recipe.objective.kind == "elmo" and recipe.data.pair_task == "none"
    small = ["eval.every=0", "eval.rows=16", "eval.batch=8"]
    with pytest.raises(UserError, match="elmo trains no pair task; set data.pair_task: none"):
        motian.pretrain(recipe="elmo-demo", data=pd98_encoded, out=tmp_path / "a", steps=1,
                        override=["data.pair_task=sop", *small], run=RUN)
    with pytest.raises(UserError, match="set data.cross_document_attention: true"):
        motian.pretrain(recipe="elmo-demo", data=pd98_encoded, out=tmp_path / "b", steps=1,
                        override=["data.cross_document_attention=false", *small], run=RUN)
    with pytest.raises(UserError, match=r"model.ffn \(LSTM cells per direction, 64\) must be"):
        motian.pretrain(recipe="elmo-demo", data=pd98_encoded, out=tmp_path / "c", steps=1,
                        override=["model.overrides={hidden: 128, ffn: 64}", *small], run=RUN)
    config = preset("tiny", vocab_size=40, hidden=16, ffn=24)
    with pytest.raises(UserError, match="task type 'pair': an ELMo model"):
        elmo_task_head("pair", config, 2)
    with pytest.raises(UserError, match="nothing is masked"):
        motian.inspect_batch(data=pd98_encoded, recipe="elmo-demo")
