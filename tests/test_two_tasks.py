"""The Motian pretraining tasks together: corpus MLM rows and pair rows (click, NSP) in the same
batches, click counts -> label and weight, the bundled People's Daily click stand-in, NSP on
real text, and uncertainty weighting that keeps its weights bounded."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from motian.data.clicks import (
    _bigrams,
    article_sentences,
    article_side,
    pd98_articles,
    pd98_clicks,
    snippets,
    write_click_log,
)
from motian.data.loader import IGNORE, LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.data.pairs import ClickSettings, nsp_plan, read_click_log, sentence_index
from motian.data.shards import EncodedDataset
from motian.errors import SkipLog, UserError
from motian.pretraining import pretrain_recipe
from motian.train.objectives import TaskWeighting
from motian.train.recipe import ObjectiveSpec, RunSettings, load_recipe
from tests.pretrain_helpers import final_weights, max_difference, write_recipe

CPU = RunSettings(device="cpu", threads=1, progress=False)
CLS, SEP = 2, 3


@pytest.fixture(scope="module")
def click_logs(tmp_path_factory):
    """Real click logs in the user format: 120 training and 60 held-out pairs of the bundled
    People's Daily stand-in (headline with a sentence of its own or another article)."""
    root = tmp_path_factory.mktemp("clicks")
    write_click_log(pd98_clicks("train")[:120], root / "train.tsv")
    write_click_log(pd98_clicks("heldout")[:60], root / "heldout.tsv")
    return root


def test_click_counts_become_label_and_weight(tmp_path):
    settings = ClickSettings(min_ctr=0.1, min_impressions=3, full_weight_impressions=20)
    assert settings.judge(2, 1) is None  # shown too rarely to judge
    assert settings.judge(40, 2) == (0, 1.0)  # clicked, but 5% is under min_ctr
    assert settings.judge(10, 3) == (1, 0.5)  # weight grows with impressions
    assert settings.judge(10, 0) == (0, 0.5)
    path = tmp_path / "log.tsv"
    path.write_text("天气\t北京天气预报\t40\t8\n房价\t上海房价\t2\t1\n电影\t新片上映\t1\n",
                    encoding="utf-8")
    rare = [0]
    pairs = read_click_log(path, SkipLog(warn=False), settings, rare)
    assert [(p.query, p.label, p.weight) for p in pairs] == [("天气", 1, 1.0), ("电影", 1, 1.0)]
    assert rare == [1]
    with pytest.raises(UserError, match="min_ctr"):
        ClickSettings(min_ctr=1.5)
    with pytest.raises(UserError, match="full_weight_impressions"):
        ClickSettings(full_weight_impressions=0)


def overlap(query: str, title: str) -> int:
    return len(_bigrams(query) & _bigrams(title))


def test_bundled_click_standin_is_split_by_article():
    train, heldout = pd98_clicks("train"), pd98_clicks("heldout")
    assert len(train) > 10_000 and len(heldout) > 2_000
    assert pd98_clicks("train") is train  # built once per process, deterministic

    def articles(records):
        return {int(n) for r in records for n in r.where.removeprefix("pd98 article ").split(" x ")}

    # Every article a pair touches (the query's and a negative's) is on the pair's side.
    assert {article_side(a) for a in articles(train)} == {"train"}
    assert {article_side(a) for a in articles(heldout)} == {"heldout"}
    by_index = {a.index: a for a in pd98_articles()}
    for r in train[:200]:
        own = by_index[int(r.where.split()[2])]
        assert r.query == own.headline
        own_titles = set(article_sentences(own))
        assert (r.title in own_titles) == (r.clicks > 0)  # clicked = its own article
        if r.clicks > 0:  # a query-biased snippet: no sentence of the article matches better
            best = snippets(own, r.query, 1)[0]
            assert overlap(r.query, r.title) <= overlap(r.query, best)
    assert 0.45 < np.mean([r.clicks > 0 for r in train]) < 0.55
    with pytest.raises(ValueError):
        pd98_clicks("test")


def test_nsp_pairs_on_real_text(pd98_encoded):
    ds = EncodedDataset(pd98_encoded)
    shards = [ds.shard(i) for i in range(len(ds))]
    sentences = sentence_index(shards)
    plan = nsp_plan(sentences, 61, np.random.default_rng(0))
    assert len(plan.label) > 100 and 0.4 < plan.label.mean() < 0.6
    assert (plan.a_len + plan.b_len <= 61).all() and (plan.b_len > 0).all()

    def document(shard, index):
        return shard, int(np.searchsorted(np.asarray(shards[shard].docs), index, "right"))

    b_shard = plan.shard_of_b()
    crossed = 0
    for i in range(len(plan.label)):
        a_doc = document(int(plan.shard[i]), plan.a_start[i])
        b_doc = document(int(b_shard[i]), plan.b_start[i])
        if plan.label[i] == 1:  # IsNext: B continues A in the same document
            assert b_doc == a_doc and plan.b_start[i] == plan.a_start[i] + plan.a_len[i]
        else:  # NotNext: B comes from another document, within that document
            assert b_doc != a_doc
            assert document(int(b_shard[i]), plan.b_start[i] + plan.b_len[i] - 1) == b_doc
            crossed += b_doc[0] != a_doc[0]
    assert crossed > 0  # random segments come from every shard, not only A's
    with pytest.raises(ValueError, match="two documents"):
        nsp_plan(_one_document(sentences), 61, np.random.default_rng(0))


def _one_document(s):
    from motian.data.pairs import SentenceIndex

    keep = s.doc == s.doc[0]
    return SentenceIndex(s.shard[keep], s.doc[keep], s.start[keep], s.end[keep],
                         s.offset[keep], s.doc_len[keep], 1)


def mixed_loader(data, click_logs, **changes):
    settings = dict(seq_len=48, batch_size=8, pair_task="click", pair_fraction=0.25,
                    click_files=(str(click_logs / "train.tsv"),),
                    masking=MaskingConfig.preset("wwm"))
    cfg = LoaderConfig(**{**settings, **changes})
    return PackedLoader(data, config=cfg)


def test_every_batch_carries_corpus_rows_and_masked_pair_rows(pd98_encoded, click_logs):
    loader = mixed_loader(pd98_encoded, click_logs)
    for arrays, masked in itertools.islice(loader.iter_numpy(), 5):
        labels = arrays["pair_labels"]
        assert labels[:6].tolist() == [IGNORE] * 6 and set(labels[6:].tolist()) <= {0, 1}
        assert (arrays["pair_weights"][:6] == 0).all() and (arrays["pair_weights"][6:] > 0).all()
        for r in (6, 7):  # [CLS] query [SEP] title [SEP], segments 0 then 1
            n = int(arrays["attention_mask"][r].sum())
            ids = arrays["tokens"][r, :n].tolist()
            assert ids[0] == CLS and ids.count(SEP) == 2 and ids[-1] == SEP
            assert arrays["token_type_ids"][r, n - 1] == 1 and arrays["token_type_ids"][r, 1] == 0
        rows = masked.mlm_positions // 48
        assert (rows < 6).any() and (rows >= 6).any()  # MLM on corpus and pair rows alike
    batch = next(iter(loader))
    assert batch["pair_labels"].dtype == torch.int64 and batch["pair_weights"].dtype == torch.float32


def test_mixed_batches_resume_exactly_and_split_over_ranks(pd98_encoded, click_logs):
    loader = mixed_loader(pd98_encoded, click_logs)
    # 120 pairs, 2 per step: the pair stream wraps into new epochs (new orders) on its own.
    batches = [a for a, _ in itertools.islice(loader.iter_numpy(), 70)]
    assert loader.pair_epoch == 1 and loader.epoch == 0
    again = mixed_loader(pd98_encoded, click_logs)
    it = again.iter_numpy()
    for _ in range(40):
        next(it)
    state = json.loads(json.dumps(again.state_dict()))
    resumed = mixed_loader(pd98_encoded, click_logs)
    resumed.load_state_dict(state)
    for want, (got, _) in zip(batches[40:], resumed.iter_numpy()):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    # Two processes with 4 rows each (3 corpus + 1 pair) take exactly the rows of one with 8.
    ranks = [mixed_loader(pd98_encoded, click_logs, batch_size=4, rank=r, world_size=2)
             for r in (0, 1)]
    for want, *parts in zip(batches[:3], *(r.iter_numpy() for r in ranks)):
        corpus = np.concatenate([p[0]["tokens"][:3] for p in parts])
        pairs = np.concatenate([p[0]["tokens"][3:] for p in parts])
        assert np.array_equal(corpus, want["tokens"][:6])
        assert np.array_equal(pairs, want["tokens"][6:])
    other = mixed_loader(pd98_encoded, click_logs, pair_fraction=0.5)
    with pytest.raises(UserError, match="pair_rows"):
        other.load_state_dict(state)


def test_pair_fraction_needs_room_for_both(pd98_encoded, click_logs):
    with pytest.raises(UserError, match="pair_fraction"):
        LoaderConfig(pair_task="click", click_files=("x",), pair_fraction=0.0)
    with pytest.raises(UserError, match="at least 2 rows"):
        _ = LoaderConfig(pair_task="click", click_files=("x",), pair_fraction=0.5,
                         batch_size=1).pair_rows


def test_uncertainty_weights_stay_in_their_bounds_and_wait_for_the_warmup():
    # The losses of a real run's plateau: MLM near 5 nats, the pair task near 0.3.
    losses = {"mlm": torch.tensor(5.0), "pair": torch.tensor(0.3)}

    def settle(spec, steps=3000, fraction=0.9):
        w = TaskWeighting(["mlm", "pair"], spec)
        opt = torch.optim.Adam(w.parameters(), lr=0.01)
        for _ in range(steps):
            w.set_progress(fraction)
            opt.zero_grad()
            w(losses, 1.0).backward()
            opt.step()
        return w.weights()

    free = settle(ObjectiveSpec(weighting="uncertainty"))
    # Unbounded, Kendall's equilibrium 1 / (2 L): MLM starves (0.1 vs 1.67).
    assert free["mlm"] == pytest.approx(0.1, rel=0.05) and free["pair"] > 1.5
    bounded = settle(ObjectiveSpec(weighting="uncertainty", weight_bounds=(0.5, 2.0)))
    assert bounded["mlm"] == pytest.approx(0.5, rel=1e-3)
    assert bounded["pair"] == pytest.approx(1.67, rel=0.05)  # inside the bounds: learned
    waiting = settle(ObjectiveSpec(weighting="uncertainty", weight_warmup=0.5), fraction=0.2)
    assert waiting == {"mlm": 1.0, "pair": 1.0}
    with pytest.raises(UserError, match="weight_bounds"):
        TaskWeighting(["mlm", "pair"], ObjectiveSpec(weight_bounds=(2.0, 4.0)))
    with pytest.raises(UserError, match="weight_warmup"):
        TaskWeighting(["mlm", "pair"], ObjectiveSpec(weight_warmup=1.0))


CLICK_DATA = ("{{masking: bert, pair_task: click, pair_fraction: 0.25, click_files: [{train}], "
              "click_eval_files: [{heldout}], click_full_weight_impressions: 20}}")


def test_pretraining_trains_mlm_and_clicks_together_and_resumes_exactly(pd98_encoded,
                                                                        click_logs, tmp_path):
    data = CLICK_DATA.format(train=click_logs / "train.tsv", heldout=click_logs / "heldout.tsv")
    objective = "{kind: mlm, weighting: uncertainty, weight_bounds: [0.5, 2.0]}"
    recipe = load_recipe(write_recipe(tmp_path, steps=12, checkpoint_every=6, eval_every=6,
                                      data=data, objective=objective))
    pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "full")
    records = [json.loads(line) for line in
               (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(k in train[-1] for k in ("loss_mlm", "loss_pair", "acc_pair", "weight_mlm",
                                        "weight_pair"))
    assert all(0.5 <= r[f"weight_{t}"] <= 2.0 for r in train for t in ("mlm", "pair"))
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert all(e["pair_rows"] == 48 and "accuracy" in e for e in evals)  # 3 batches of 16

    # Stop after the step-6 checkpoint (a shorter run of the same recipe writes the same
    # first 6 steps), then resume to 12: the same weights as the uninterrupted run.
    import shutil

    part = tmp_path / "part"
    pretrain_recipe(recipe, CPU, pd98_encoded, part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "step-00000012")
    pretrain_recipe(recipe, CPU, pd98_encoded, part, resume=True)
    assert max_difference(final_weights(part), final_weights(tmp_path / "full")) <= 1e-6


def test_bert_nsp_from_the_cli_with_overrides(pd98_encoded, tmp_path):
    """`motian pretrain --override` changes recipe fields (here: MLM + NSP, BERT's pair task),
    checked like a recipe file; a bad override is a one-line error naming it."""
    import subprocess
    import sys

    from tests.test_pretrain_resume import env, pretrain_command

    recipe = write_recipe(tmp_path, steps=4, checkpoint_every=0, eval_every=0)
    out = tmp_path / "nsp"
    done = subprocess.run(pretrain_command(recipe, pd98_encoded, out, "--override",
                                           "data.pair_task=nsp", "objective.weighting=fixed"),
                          env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    saved = load_recipe(out / "recipe.yaml")
    assert saved.data.pair_task == "nsp" and saved.objective.weighting == "fixed"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["pair_rows"] > 0  # NSP on the held-out documents
    bad = subprocess.run([sys.executable, "-m", "motian.cli", "pretrain", "--recipe",
                          str(recipe), "--data", str(pd98_encoded), "--out", str(tmp_path / "x"),
                          "--override", "data.pair_fraction=2"], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "pair_fraction" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_headline_task_uses_only_articles_kept_out_of_pretraining():
    from motian.tasks.builtin import load_builtin, pd98_heldout_lines

    task = load_builtin("pd98-headline")
    sizes = task.sizes()
    assert sizes["train"] > 800 and sizes["dev"] > 200 and sizes["test"] > 1000
    articles = {split: {int(e.where.split("pd98 article ")[1].split()[0]) for e in examples}
                for split, examples in task.splits.items()}
    assert not (articles["train"] & articles["test"]) and not (articles["dev"] & articles["test"])
    assert not (articles["train"] & articles["dev"])
    # `motian prepare --exclude-heldout` (the default) drops these articles from the corpus.
    first_line = {a.index: a.line for a in pd98_articles()}
    held = pd98_heldout_lines()
    assert all(first_line[a] in held for split in articles.values() for a in split)
    for examples in task.splits.values():
        assert 0.4 < np.mean([e.label for e in examples]) < 0.6
        assert all(e.text and e.text_b for e in examples)


def test_pair_rows_per_step_do_not_depend_on_the_micro_batch():
    from motian.pretraining import micro_pair_fraction
    from motian.train.recipe import DataSpec, Stage

    data = DataSpec(pair_task="click", click_files=("pd98",), pair_fraction=0.25)
    stage = Stage(global_batch=32)
    for micro in (32, 16, 8, 4):  # (per process: 16 x 2 processes is micro 16 too)
        fraction = micro_pair_fraction(data, stage, micro)
        per_micro = LoaderConfig(batch_size=micro, pair_task="click", click_files=("x",),
                                 pair_fraction=fraction).pair_rows
        assert per_micro * (32 // micro) == 8  # every split: 8 pair rows, 24 corpus rows
    with pytest.raises(UserError, match="micro-batch"):
        micro_pair_fraction(data, stage, 2)  # 16 micro-batches cannot share 8 pair rows


def test_masking_a_batch_with_an_empty_row():
    """A packed epoch can end in a row holding only [CLS] [SEP] (the stream is one token past
    a whole number of rows): masking must skip it, not index past the rows that have words."""
    from motian.data.masking import Masker

    masker = Masker(MaskingConfig.preset("wwm"), mask_id=4, random_ids=np.arange(10, 50))
    tokens = np.array([[2, 11, 12, 13, 14, 3], [2, 3, 0, 0, 0, 0], [2, 21, 22, 23, 24, 3]])
    content = np.zeros_like(tokens, dtype=bool)
    content[[0, 2], 1:5] = True
    starts = content & (np.arange(6) % 2 == 1)
    out = masker(tokens, starts, content, np.full(tokens.shape, -1), np.random.default_rng(0))
    rows = out.mlm_positions // 6
    assert set(rows.tolist()) == {0, 2}  # one word (2 tokens) masked in each row with words
