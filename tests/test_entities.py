"""Entity masking (ERNIE 1.0): entities from POS tags and entity lists, marked by `encode`,
masked whole by the loader in the configured share; bad input is a UserError naming file and
line; shards without entity marks are refused by entity masking."""

from __future__ import annotations

import numpy as np
import pytest

from motian.data.encode import encode
from motian.data.entities import EntityList, parse_tagged_line, tagged_spans
from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import NONE, Masker, MaskingConfig
from motian.data.shards import ENTITY_START, IN_ENTITY, EncodedDataset
from motian.data.sources import iter_documents, pd98_path
from motian.data.tokenizer import train_tokenizer
from motian.errors import UserError
from motian.train.recipe import load_recipe, with_fields

TAGS = ("nr", "ns", "nt")


def test_tagged_sentence_gives_person_place_and_organisation_units():
    line = ("中共中央/nt  总书记/n  江/nr  泽民/nr  在/p  北京/ns  会见/v  "
            "[中央/n  人民/n  广播/vn  电台/n]nt  台长/n  。/w")
    text, spans = tagged_spans(parse_tagged_line(line, "t.txt:1"), TAGS)
    assert text == "中共中央总书记江泽民在北京会见中央人民广播电台台长。"
    assert [(text[s:e], t) for s, e, t in spans] == [
        ("中共中央", "nt"), ("江泽民", "nr"), ("北京", "ns"), ("中央人民广播电台", "nt")]
    # two places side by side stay two entities; only persons (surname + name) merge
    _, spans = tagged_spans([("中国", "ns"), ("北京", "ns")], TAGS)
    assert len(spans) == 2


@pytest.mark.parametrize("line", ["江泽民 发表/v", "江/ 泽民/nr", "[中央/n 电台/n]",
                                  "[中央/n 电台/n", "[中/n [央/n]nt"])
def test_malformed_tagger_output_names_file_and_line(tmp_path, line):
    bad = tmp_path / "tagged.txt"
    bad.write_text("北京/ns 欢迎/v 你/r\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"tagged\.txt:2: "):
        list(iter_documents([str(bad)], tags=TAGS))


def test_encode_refuses_bad_entity_input_before_any_work(tagged_corpus, tmp_path):
    bad = tmp_path / "tagged.txt"
    bad.write_text("北京/ns 欢迎/v 你/r\n江泽民/nr 发表\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"tagged\.txt:2: '发表' is not a word/TAG token"):
        encode([str(bad)], tmp_path / "enc", tagged_corpus / "tok", entities="tags",
               workers=1, progress=False)
    listing = tmp_path / "entities.txt"
    listing.write_text("北京\n\tLOC\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"entities\.txt:2: "):
        encode([str(bad)], tmp_path / "enc2", tagged_corpus / "tok", entities=str(listing),
               workers=1, progress=False)
    with pytest.raises(UserError, match=r"JSON lines"):
        (tmp_path / "a.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
        encode([str(tmp_path / "a.jsonl")], tmp_path / "enc3", tagged_corpus / "tok",
               entities="tags", workers=1, progress=False)


def test_encode_with_an_entity_list_marks_its_matches(tagged_corpus, tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("北京大学生在北京和清华\n", encoding="utf-8")
    listing = tmp_path / "entities.txt"
    listing.write_text("北京\n北京大学\n清华\n", encoding="utf-8")
    manifest = encode([str(plain)], tmp_path / "enc", tagged_corpus / "tok",
                      entities=str(listing), workers=1, progress=False)
    assert manifest["settings"]["entities"]["source"] == "list"
    data = EncodedDataset(tmp_path / "enc")
    vocab = (tmp_path / "enc" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    shard = data.shard(0)
    names = ["".join(vocab[t] for t in shard.tokens[s:e]).replace("##", "")
             for s, e in _entity_runs(np.asarray(shard.flags))]
    assert names == ["北京大学", "北京", "清华"]


def test_entity_list_matches_leftmost_longest(tmp_path):
    path = tmp_path / "entities.txt"
    path.write_text("# places and schools\n北京\n北京大学\t\tORG\n".replace("\t\t", "\t")
                    + "大学生\n\n清华\tORG\n", encoding="utf-8")
    found = EntityList.load(path)
    text = "北京大学生在北京和清华"
    assert [text[s:e] for s, e in found.find(text)] == ["北京大学", "北京", "清华"]


@pytest.mark.parametrize("content, line", [("北京\n上海\tLOC\tx\n", 2), ("北京\n\tLOC\n", 2),
                                           ("北京\n 上海\n", 2), ("北京\n上海 \n", 2)])
def test_malformed_entity_list_names_file_and_line(tmp_path, content, line):
    path = tmp_path / "list.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=rf"list\.txt:{line}: "):
        EntityList.load(path)
    (tmp_path / "bytes.txt").write_bytes("北京\n".encode() + b"\xff\xfe\n")
    with pytest.raises(UserError, match=r"bytes\.txt:2: not UTF-8"):
        EntityList.load(tmp_path / "bytes.txt")


@pytest.fixture(scope="module")
def tagged_corpus(tmp_path_factory):
    """The first 400 lines of People's Daily 1998 as the tagger output they are, a vocabulary
    trained on their text, and the shards `encode --entities tags` makes of them."""
    root = tmp_path_factory.mktemp("ernie")
    lines = pd98_path().read_text(encoding="utf-8").splitlines()[:400]
    tagged = root / "pd98-tagged.txt"
    tagged.write_text("\n".join(lines) + "\n", encoding="utf-8")
    plain = root / "plain.txt"
    plain.write_text("\n".join(text for text, _ in (
        tagged_spans(parse_tagged_line(x, "x"), TAGS) for x in lines if x.strip())) + "\n",
        encoding="utf-8")
    train_tokenizer([str(plain)], root / "tok", vocab_size=2000, progress=False)
    encode([str(tagged)], root / "enc", root / "tok", entities="tags", workers=1,
           shard_docs=200, progress=False)
    encode([str(plain)], root / "plain-enc", root / "tok", workers=1, progress=False)
    return root


def _entity_runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) token runs of the entities marked in flags (1-D)."""
    runs, start = [], None
    for i, f in enumerate(flags.tolist() + [0]):
        if start is not None and (not f & IN_ENTITY or f & ENTITY_START):
            runs.append((start, i))
            start = None
        if f & ENTITY_START:
            start = i
    return runs


def test_encode_marks_tagged_entities_as_whole_word_runs(tagged_corpus):
    data = EncodedDataset(tagged_corpus / "enc")
    assert data.manifest["settings"]["entities"] == {"source": "tags", "tags": list(TAGS)}
    vocab = (tagged_corpus / "enc" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    shard = data.shard(0)
    runs = _entity_runs(np.asarray(shard.flags))
    names = {"".join(vocab[t] for t in shard.tokens[s:e]).replace("##", "") for s, e in runs}
    assert {"江泽民", "中共中央", "香港", "邓小平"} <= names
    assert data.manifest["counts"]["entities"] == sum(
        int(np.count_nonzero(np.asarray(data.shard(i).flags) & ENTITY_START))
        for i in range(len(data)))
    # the entity's first token and the token after it start words
    flags = np.asarray(shard.flags)
    assert all(flags[s] & 1 and (e == len(flags) or flags[e] & 1) for s, e in runs)


def _loader(root, masking: MaskingConfig, data: str = "enc") -> PackedLoader:
    return PackedLoader(root / data, config=LoaderConfig(seq_len=128, batch_size=64, seed=3,
                                                         masking=masking))


def _masked_batches(loader: PackedLoader, n: int):
    """(flags (B, L), masked batch) for the first n batches of epoch 0."""
    plan, B = loader._plan(0), loader.config.batch_size
    for i in range(n):
        rows = plan.row_order[i * B:(i + 1) * B]
        flags = loader._packed_rows(plan, rows)["flags"]
        yield flags, loader.make_batch(plan, rows, np.random.default_rng(i))[1]


def test_masking_never_splits_an_entity_and_raises_their_share(tagged_corpus):
    share = {}
    for p in (0.0, 0.5):
        loader = _loader(tagged_corpus, MaskingConfig(strategy="whole_word", entity_prob=p))
        entity_units = units = whole = 0
        for flags, masked in _masked_batches(loader, 4):
            chosen = masked.actions != NONE
            units += int((masked.word_starts & chosen).sum())
            for r in range(len(chosen)):
                for s, e in _entity_runs(flags[r]):
                    if p:  # all of its tokens or none
                        assert chosen[r, s:e].all() or not chosen[r, s:e].any(), (r, s, e)
                    whole += int(chosen[r, s:e].all())
                    entity_units += int(chosen[r, s])
        share[p] = entity_units / units
        assert whole == entity_units or not p
    # Without entity masking few picks fall on entities (6.5% here). Asked for half, a pick is
    # an entity with probability 1/2 only while its row has entities left: rows of 128 tokens
    # of news hold a few, so the share measured here is 30%, not 50% (the controlled sample
    # below checks the share itself).
    assert share[0.0] < 0.12 and 0.2 < share[0.5] <= 0.55, share


def test_entity_share_follows_entity_prob_on_a_controlled_sample():
    """Rows of two-token words, every other one an entity: picks are entities with
    probability entity_prob (neither kind runs out within a 15% budget)."""
    B, L = 400, 96
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 500, size=(B, L))
    content = np.ones((B, L), bool)
    word_start = np.zeros((B, L), bool)
    word_start[:, ::2] = True
    in_entity = np.zeros((B, L), bool)
    for k in range(0, L, 4):
        in_entity[:, k:k + 2] = True
    entity_start = in_entity & word_start
    for p in (0.2, 0.5, 0.8):
        masker = Masker(MaskingConfig(strategy="ngram", entity_prob=p), 4, np.arange(10, 500))
        m = masker(tokens, word_start, content, np.full((B, L), -1), rng, entity_start,
                   in_entity)
        chosen = m.actions != NONE
        ent = (chosen & entity_start).sum()
        # entities are units alone and every other word sits between two entities here, so
        # each chosen word is one picked unit
        other_units = (chosen & ~in_entity & word_start).sum()
        got = ent / (ent + other_units)
        assert abs(got - p) < 0.05, (p, got)
        # whole entities only
        pairs = chosen[:, 0::4] == chosen[:, 1::4]
        assert pairs.all()


def test_old_shards_without_entities_are_refused(tagged_corpus):
    with pytest.raises(UserError, match=r"manifest\.json: these shards carry no entity spans.*"
                                        r"--entities"):
        _loader(tagged_corpus, MaskingConfig.preset("ernie"), data="plain-enc")
    # entity_prob 0 reads them as before
    _loader(tagged_corpus, MaskingConfig.preset("wwm"), data="plain-enc")


def test_ernie_from_the_recipe_and_overrides():
    assert load_recipe("ernie-demo").data.masking_config().entity_prob == pytest.approx(1 / 3)
    demo = with_fields(load_recipe("demo"), ["data.masking=ernie"])
    assert demo.data.masking_config().entity_prob == pytest.approx(1 / 3)
    tuned = with_fields(demo, ["data.masking_overrides={entity_prob: 0.5}"])
    assert tuned.data.masking_config().entity_prob == 0.5
    with pytest.raises((UserError, ValueError), match="entity_prob"):
        MaskingConfig.preset("ernie", entity_prob=1.5)
