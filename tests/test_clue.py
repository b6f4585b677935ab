"""Every CLUE reader on tiny files in the task's own layout (written here), a malformed record
in each naming its file and line or record, and the submission files."""

import json

import pytest

from motian.errors import UserError
from motian.tasks.clue import CLUE, TNEWS_LABELS, load_clue, write_submission


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def write_task(root, name, files):
    d = root / name
    d.mkdir()
    for file, content in files.items():
        if not (isinstance(content, list) and content and isinstance(content[0], dict)):
            # JSON (CMRC2018, C3, answer files); lists of records are JSON lines
            (d / file).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        else:
            jsonl(d / file, content)
    return d


AFQMC = [{"sentence1": "花呗怎么还款", "sentence2": "花呗如何还钱", "label": "1"},
         {"sentence1": "借呗额度", "sentence2": "花呗开通", "label": "0"}]
TNEWS = [{"label": "102", "label_desc": "news_entertainment", "sentence": "新片首映",
          "keywords": "电影"},
         {"label": "116", "label_desc": "news_game", "sentence": "游戏更新", "keywords": ""}]
WSC = [{"target": {"span2_index": 6, "span1_index": 0, "span1_text": "小明", "span2_text": "他"},
        "idx": 0, "label": "true", "text": "小明说今天，他很累。"}]
CLUENER = [{"text": "浙商银行企业信贷部叶老桂博士", "label": {
    "name": {"叶老桂": [[9, 11]]}, "company": {"浙商银行": [[0, 3]]}}}]
CMRC = {"version": "v1.0", "data": [{"id": "D1", "title": "t", "paragraphs": [{
    "id": "D1P1", "context": "范廷颂是越南罗马天主教枢机。",
    "qas": [{"question": "范廷颂是哪国人？", "id": "D1Q1",
             "answers": [{"text": "越南", "answer_start": 4}]},
            {"question": "他是什么？", "id": "D1Q2",  # shifted offset: relocated
             "answers": [{"text": "枢机", "answer_start": 3}]}]}]}]}
C3 = [[["男：你今天去哪儿？", "女：去图书馆。"],
       [{"question": "女的去哪儿？", "choice": ["学校", "图书馆", "商店"], "answer": "图书馆"}],
       "m1-1"]]
CHID = [{"candidates": ["一目了然", "画蛇添足", "守株待兔"],
         "content": ["这件事#idiom000001#，不必多说。他总是#idiom000002#。"]}]


def test_classification_readers(tmp_path):
    task = load_clue("afqmc", write_task(tmp_path, "afqmc", {
        "train.json": AFQMC, "dev.json": AFQMC,
        "test.json": [{"id": 7, "sentence1": "a", "sentence2": "b"}]}))
    assert task.type == "pair" and task.sizes() == {"train": 2, "dev": 2, "test": 1}
    e = task.splits["train"][0]
    assert (e.text, e.text_b, e.label) == ("花呗怎么还款", "花呗如何还钱", 1)
    assert task.splits["test"][0].guid == "7" and not task.labelled("test")

    tnews = load_clue("tnews", write_task(tmp_path, "tnews", {"train.json": TNEWS}))
    assert [e.label for e in tnews.splits["train"]] == [TNEWS_LABELS.index("102"),
                                                         TNEWS_LABELS.index("116")]
    assert len(tnews.labels) == 15

    nli = [{"sentence1": "他来了", "sentence2": "有人来了", "label": "entailment"},
           {"sentence1": "a", "sentence2": "b", "label": "-"},  # no consensus: skipped
           {"sentence1": "他来了", "sentence2": "他没来", "label": "contradiction"}]
    for name in ("ocnli", "cmnli"):
        task = load_clue(name, write_task(tmp_path, name, {"train.json": nli}))
        assert [e.label for e in task.splits["train"]] == [0, 2]

    iflytek = load_clue("iflytek", write_task(tmp_path, "iflytek", {"train.json": [
        {"label": "11", "label_des": "薅羊毛", "sentence": "领红包的应用"}]}))
    assert iflytek.splits["train"][0].label == 11 and len(iflytek.labels) == 119

    csl = load_clue("csl", write_task(tmp_path, "csl", {"train.json": [
        {"id": 1, "abst": "本文提出一种方法", "keyword": ["方法", "模型"], "label": "1"}]}))
    e = csl.splits["train"][0]
    assert (e.text, e.text_b, e.label) == ("方法；模型", "本文提出一种方法", 1)


def test_wsc_marks_both_spans(tmp_path):
    task = load_clue("cluewsc2020", write_task(tmp_path, "wsc", {"train.json": WSC}))
    e = task.splits["train"][0]
    assert e.text == "_小明_说今天，[他]很累。" and e.label == 0
    bad = [dict(WSC[0], target={**WSC[0]["target"], "span2_index": 3})]
    d = write_task(tmp_path, "wsc_bad", {"train.json": bad})
    with pytest.raises(UserError, match=r"train.json:1: target span2_text '他' is not at"):
        load_clue("cluewsc2020", d)


def test_cluener_reader_and_submission(tmp_path):
    task = load_clue("cluener2020", write_task(tmp_path, "cluener", {
        "train.json": CLUENER, "test.json": [{"id": 0, "text": "浙商银行"}]}))
    e = task.splits["train"][0]
    assert e.entities == [(0, 4, "company"), (9, 12, "name")]
    path = write_submission(task, task.splits["test"], [[(0, 4, "company")]], tmp_path / "sub")
    assert path.name == "cluener_predict.json"
    assert json.loads(path.read_text("utf-8")) == {
        "id": 0, "label": {"company": {"浙商银行": [[0, 3]]}}}
    bad = [{"text": "浙商银行", "label": {"company": {"浙商银行": [[1, 4]]}}}]
    with pytest.raises(UserError, match=r"train.json:1: entity '浙商银行'"):
        load_clue("cluener", write_task(tmp_path, "cluener_bad", {"train.json": bad}))


def test_cmrc2018_reader_and_submission(tmp_path):
    task = load_clue("cmrc2018", write_task(tmp_path, "cmrc", {"train.json": CMRC}))
    q1, q2 = task.splits["train"]
    assert (q1.guid, q1.text_b, q1.answers) == ("D1Q1", "范廷颂是哪国人？", [("越南", 4)])
    assert q2.answers == [("枢机", 11)]  # moved to where the text really is
    path = write_submission(task, task.splits["train"], ["越南", "枢机"], tmp_path / "sub")
    assert json.loads(path.read_text("utf-8")) == {"D1Q1": "越南", "D1Q2": "枢机"}
    bad = {"data": [{"paragraphs": [{"context": "x", "qas": [{"question": "q"}]}]}]}
    with pytest.raises(UserError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'id'"):
        load_clue("cmrc2018", write_task(tmp_path, "cmrc_bad", {"train.json": bad}))


def test_c3_reader(tmp_path):
    task = load_clue("c3", write_task(tmp_path, "c3", {"d-train.json": C3, "m-train.json": C3}))
    assert len(task.splits["train"]) == 2
    e = task.splits["train"][0]
    assert e.choices == ["学校", "图书馆", "商店"] and e.label == 1 and e.text_b == "女的去哪儿？"
    assert e.text == "男：你今天去哪儿？\n女：去图书馆。"
    bad = [[["x"], [{"question": "q", "choice": ["a", "b"], "answer": "c"}], "id"]]
    with pytest.raises(UserError, match=r"d-train.json: record 0 question 0: answer 'c'"):
        load_clue("c3", write_task(tmp_path, "c3_bad", {"d-train.json": bad}))


def test_chid_reader_and_submission(tmp_path):
    answers = {"#idiom000001#": 0, "#idiom000002#": 2}
    d = write_task(tmp_path, "chid", {"train.json": CHID, "train_answer.json": answers,
                                      "test.json": CHID})
    task = load_clue("chid", d)
    first, second = task.splits["train"]
    assert (first.guid, first.label, second.label) == ("#idiom000001#", 0, 2)
    assert first.text.startswith("这件事＿＿＿＿，") and "#idiom000002#" in first.text
    assert first.choices == CHID[0]["candidates"]
    assert not task.labelled("test")
    path = write_submission(task, task.splits["test"], [0, 2], tmp_path / "sub")
    assert path.name == "chid11_predict.json"
    assert json.loads(path.read_text("utf-8")) == answers
    (d / "train_answer.json").write_text(json.dumps({"#idiom000001#": 0}), encoding="utf-8")
    with pytest.raises(UserError, match=r"train.json:1: blank #idiom000002# has no entry"):
        load_clue("chid", d)


def test_bad_json_line_and_missing_field_name_the_line(tmp_path):
    d = tmp_path / "afqmc"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(AFQMC[0]) + "\n{\"sentence1\": \"x\",\n",
                                  encoding="utf-8")
    with pytest.raises(UserError, match=r"train.json:2: not valid JSON"):
        load_clue("afqmc", d)
    (d / "train.json").write_text(json.dumps({"sentence1": "x", "label": "1"}) + "\n",
                                  encoding="utf-8")
    with pytest.raises(UserError, match=r"train.json:1: missing field 'sentence2'"):
        load_clue("afqmc", d)
    (d / "train.json").write_text(json.dumps({**AFQMC[0], "label": "2"}) + "\n",
                                  encoding="utf-8")
    with pytest.raises(UserError, match=r"train.json:1: label '2' is not one of 0, 1"):
        load_clue("afqmc", d)
    with pytest.raises(UserError, match="no training file"):
        load_clue("tnews", tmp_path)
    with pytest.raises(UserError, match="unknown CLUE task"):
        load_clue("glue", d)


def test_classification_submission_uses_clue_names(tmp_path):
    task = load_clue("tnews", write_task(tmp_path, "tnews", {
        "train.json": TNEWS, "test.json": [{"id": 0, "sentence": "x"}, {"id": 1, "sentence": "y"}]}))
    path = write_submission(task, task.splits["test"], [0, 14], tmp_path / "sub")
    assert path.name == "tnews11_predict.json"
    lines = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
    assert lines == [{"id": 0, "label": "100"}, {"id": 1, "label": "116"}]
    assert {s.submission for s in CLUE.values()} >= {"afqmc_predict.json", "c311_predict.json",
                                                     "cluewsc11_predict.json",
                                                     "ocnli_50k_predict.json"}


def test_only_the_test_split_gets_the_submission_name(tmp_path):
    """A dev split is written as <task>_dev_predictions.json: scoring dev next to a test
    submission never replaces it."""
    task = load_clue("afqmc", write_task(tmp_path, "afqmc", {
        "train.json": AFQMC, "dev.json": AFQMC,
        "test.json": [{"id": 7, "sentence1": "a", "sentence2": "b"}]}))
    out = tmp_path / "sub"
    test = write_submission(task, task.splits["test"], [1], out)
    assert test.name == "afqmc_predict.json"
    submitted = test.read_bytes()
    dev = write_submission(task, task.splits["dev"], [0, 1], out, split="dev")
    assert dev.name == "afqmc_dev_predictions.json" and test.read_bytes() == submitted
    assert [json.loads(x)["label"] for x in dev.read_text("utf-8").splitlines()] == ["0", "1"]
    assert sorted(p.name for p in out.iterdir()) == [dev.name, test.name]  # no temp files


@pytest.mark.parametrize("name, files, expected", [
    ("tnews", {"test1.1.json": [{"id": 0, "sentence": "x"}]}, "tnews11_predict.json"),
    ("tnews", {"test.json": [{"id": 0, "sentence": "x"}]}, "tnews11_predict.json"),
    ("tnews", {"test1.0.json": [{"id": 0, "sentence": "x"}]}, "tnews10_predict.json"),
    ("c3", {"test1.1.json": C3}, "c311_predict.json"),
    ("c3", {"test1.0.json": C3}, "c310_predict.json"),
    ("cluewsc2020", {"test1.0.json": [{k: v for k, v in WSC[0].items() if k != "label"}]},
     "cluewsc10_predict.json"),
    ("chid", {"test1.0.json": CHID}, "chid10_predict.json"),
])
def test_versioned_submission_name_follows_the_file_read(tmp_path, name, files, expected):
    """CLUE names tnews/cluewsc2020/c3/chid submissions by test-set version (11 for 1.1, 10 for
    1.0); the name follows the test file actually read."""
    train = {"tnews": {"train.json": TNEWS}, "c3": {"d-train.json": C3},
             "cluewsc2020": {"train.json": WSC},
             "chid": {"train.json": CHID,
                      "train_answer.json": {"#idiom000001#": 0, "#idiom000002#": 2}}}[name]
    task = load_clue(name, write_task(tmp_path, name, {**train, **files}))
    examples = task.splits["test"]
    path = write_submission(task, examples, [0] * len(examples), tmp_path / "sub")
    assert path.name == expected


def test_files_that_are_not_utf8_are_named_with_the_line(tmp_path):
    d = tmp_path / "afqmc"
    d.mkdir()
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in AFQMC)
    (d / "train.json").write_bytes(body.encode("gbk"))  # a GBK file from a Windows editor
    with pytest.raises(UserError, match=r"train.json:1: not UTF-8 .*iconv"):
        load_clue("afqmc", d)
    (d / "train.json").write_bytes(body.encode("utf-8") + b"\x89PNG\r\x1a\xff\xfe\n")
    with pytest.raises(UserError, match=r"train.json:3: not UTF-8"):
        load_clue("afqmc", d)
    (d / "train.json").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # a BOM is fine
    assert len(load_clue("afqmc", d).splits["train"]) == 2
    c3 = write_task(tmp_path, "c3", {"d-train.json": C3})
    (c3 / "d-train.json").write_bytes(json.dumps(C3, ensure_ascii=False, indent=1)
                                      .encode("gbk"))
    with pytest.raises(UserError, match=r"d-train.json:4: not UTF-8 \(byte 4 "):
        load_clue("c3", c3)
