"""Reliability and security (issue 15): a data folder cannot run code, the package loads no
pickles, bad input gives a message naming the file (never a traceback), `predict --out` never
destroys an existing file, and scoring a dev split never replaces a CLUE test submission.

CLI behaviours are checked through the real command line in a subprocess, on real files."""

from __future__ import annotations

import ast
import gzip
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from motian import api
from motian.cli import main
from motian.data.sources import iter_documents
from motian.errors import SkipLog
from motian.finetuning import evaluate, finetune
from tests import test_export
from tests.settings_helpers import typed
from tests.test_clue import jsonl
from tests.test_export import tiny_checkpoint

review_tokenizer = test_export.review_tokenizer  # the session fixture: one vocabulary
ROOT = Path(__file__).resolve().parents[1]


def motian(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real command line (`python -m motian.cli ...`) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "motian.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_message(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 1 with `motian: error: ...` containing every needle, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "motian: error:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


# --------------------------------------------------------------------------- 1. no code from data


class _RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_crafted_synonyms_npz_runs_no_code(pd98_encoded, tmp_path):
    data = tmp_path / "enc"
    shutil.copytree(pd98_encoded, data)
    marker = tmp_path / "PWNED"
    # What an old motian wrote (words as an object array), with a word that runs a command.
    np.savez(data / "synonyms.npz", start=np.zeros(1, np.int64), count=np.zeros(1, np.int32),
             length=np.ones(1, np.int32), tokens=np.zeros(0, np.int32),
             words=np.array([_RunsCode(marker)], dtype=object))
    proc = motian("inspect-batch", "--data", data, "--examples", "1")
    assert not marker.exists(), "loading the data folder ran code from synonyms.npz"
    assert_message(proc, str(data / "synonyms.npz"), "motian encode")


# --------------------------------------------------------------------------- 2. no pickles at all


def pickle_loads(source: str, name: str = "<src>") -> list[str]:
    """Places in `source` that would unpickle: allow_pickle=True (or not a literal False),
    pickle/dill/joblib/cloudpickle .load(s), torch.load without weights_only=True, yaml.load /
    unsafe_load / full_load (yaml.safe_load is fine)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{name}:{node.lineno}"
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                         and kw["allow_pickle"].value is False):
            found.append(f"{where}: allow_pickle=True")
        func = node.func
        if not isinstance(func, ast.Attribute):
            continue
        owner = ast.unparse(func.value)
        if owner in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") and \
                func.attr in ("load", "loads", "Unpickler"):
            found.append(f"{where}: {owner}.{func.attr}")
        if owner == "torch" and func.attr == "load":
            weights_only = kw.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if owner == "yaml" and func.attr in ("load", "load_all", "unsafe_load", "full_load"):
            found.append(f"{where}: yaml.{func.attr} (use yaml.safe_load)")
    return found


def test_the_scanner_finds_every_kind_of_pickle_load():
    bad = ("np.load(p, allow_pickle=True)\npickle.load(f)\npickle.loads(b)\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(s)\n"
           "np.load(p, allow_pickle=flag)\n")
    assert len(pickle_loads(bad)) == 7
    good = ("np.load(p, allow_pickle=False)\ntorch.load(p, map_location='cpu', "
            "weights_only=True)\nyaml.safe_load(s)\n'torch.load(p) in a string'\n")
    assert pickle_loads(good) == []


def test_the_package_loads_no_pickles():
    found = []
    for path in sorted((ROOT / "motian").rglob("*.py")):
        found += pickle_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert found == [], "code that can unpickle (and so run code from a file):\n" + \
        "\n".join(found)


# --------------------------------------------------------------------------- 3. messages


def _reviews_dir(root: Path, reviews, encoding="utf-8") -> Path:
    pos, neg = reviews
    d = root / "mine"
    d.mkdir()
    rows = [{"text": t, "label": "pos"} for t in pos[:4]] + \
        [{"text": t, "label": "neg"} for t in neg[:4]]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (d / "train.jsonl").write_bytes(body.encode(encoding))
    (d / "dev.jsonl").write_bytes(body.encode("utf-8"))
    return d


def test_gbk_task_file_is_named_with_its_line(tmp_path, reviews, vocab):
    d = _reviews_dir(tmp_path, reviews, encoding="gbk")
    proc = motian("finetune", "--task", "text-classification", "--data", d, "--out",
                  tmp_path / "run", "--tokenizer", vocab, "--seeds", "1")
    assert_message(proc, f"{d / 'train.jsonl'}:1: not UTF-8", "iconv")


def test_binary_clue_file_is_named_with_its_line(tmp_path, vocab):
    d = tmp_path / "afqmc"
    d.mkdir()
    jsonl(d / "train.json", [{"sentence1": "花呗", "sentence2": "借呗", "label": "1"}])
    (d / "dev.json").write_bytes(b'{"sentence1": "a", "sentence2": "b", "label": "1"}\n'
                                 + b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(128, 256)))
    proc = motian("finetune", "--task", "afqmc", "--data", d, "--out", tmp_path / "run",
                  "--tokenizer", vocab, "--seeds", "1")
    assert_message(proc, f"{d / 'dev.json'}:2: not UTF-8")


def test_corrupt_gzip_is_reported_not_a_traceback(tmp_path):
    good = gzip.compress("你好，世界。这是一个测试文件。\n".encode() * 50)
    bad = tmp_path / "corpus.txt.gz"
    bad.write_bytes(good[:10] + b"\xff" * 200)  # a gzip header, then no valid deflate block
    with pytest.raises(zlib.error):  # what the file does to a plain reader
        gzip.decompress(bad.read_bytes())
    skips = SkipLog(warn=False)  # the reader: the file is counted as unreadable, and named
    assert list(iter_documents([bad], skips=skips)) == []
    (example,) = skips.examples["unreadable data (corrupt or truncated file)"]
    assert example.startswith(f"{bad}:1: error") and "gzip -t" in example
    proc = motian("clean", "--inputs", bad, "--out", tmp_path / "clean")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{bad}:1: unreadable data (corrupt or truncated file)" in proc.stderr, proc.stderr
    assert "gzip -t" in proc.stderr


@pytest.fixture
def classifier(tmp_path, review_tokenizer):
    return tiny_checkpoint(tmp_path / "ckpt", "SequenceClassification", review_tokenizer)


def test_predict_text_must_be_a_string(tmp_path, classifier):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "很好"}\n{"text": 12345}\n', encoding="utf-8")
    proc = motian("predict", "--model", classifier, "--inputs", inputs, "--out",
                  tmp_path / "out.jsonl")
    assert_message(proc, f"{inputs}:2: text must be a str")
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("很好\n太差了\n".encode("gbk"))
    proc = motian("predict", "--model", classifier, "--inputs", gbk)
    assert_message(proc, f"{gbk}:1: not UTF-8")


def test_encode_with_a_corrupt_tokenizer_json(tmp_path, review_tokenizer):
    tok = tmp_path / "tok"
    shutil.copytree(review_tokenizer, tok)
    text = (tok / "tokenizer.json").read_text(encoding="utf-8")
    (tok / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")  # cut short
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天天气很好，我们去公园散步。\n" * 20, encoding="utf-8")
    proc = motian("encode", "--inputs", corpus, "--out", tmp_path / "enc", "--tokenizer", tok,
                  "--workers", "1", "--no-progress")
    assert_message(proc, str(tok / "tokenizer.json"), "motian tokenizer")


@pytest.mark.parametrize("verb", sorted(api.VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert "usage: motian" in capsys.readouterr().out


def test_clean_help_through_the_real_cli():
    proc = motian("clean", "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "--max-dup-line-ratio" in proc.stdout


# --------------------------------------------------------------------------- 4. predict --out


def test_predict_out_keeps_the_old_file_when_a_line_is_bad(tmp_path, classifier):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    out = out_dir / "predictions.jsonl"
    out.write_text('{"label": "yesterday\'s results"}\n', encoding="utf-8")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": i, "text": f"第{i}条评论很好"}) + "\n"
                              for i in range(100)) + '{"id": 100, "text": }\n', encoding="utf-8")
    proc = motian("predict", "--model", classifier, "--inputs", inputs, "--out", out,
                  "--batch-size", "8")
    assert_message(proc, f"{inputs}:101: not valid JSON")
    assert out.read_text(encoding="utf-8") == '{"label": "yesterday\'s results"}\n'
    assert sorted(p.name for p in out_dir.iterdir()) == ["predictions.jsonl"]  # no temp file
    # The same input without the bad line replaces the file.
    inputs.write_text("".join(inputs.read_text(encoding="utf-8").splitlines(True)[:100]),
                      encoding="utf-8")
    proc = motian("predict", "--model", classifier, "--inputs", inputs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 100
    assert sorted(p.name for p in out_dir.iterdir()) == ["predictions.jsonl"]


# --------------------------------------------------------------------------- 5. submissions


def test_evaluating_dev_never_replaces_the_test_submission(tmp_path, reviews, vocab):
    pos, neg = reviews
    train = [{"sentence1": t, "sentence2": t, "label": "1"} for t in pos[:6]] + \
        [{"sentence1": a, "sentence2": b, "label": "0"} for a, b in zip(pos[:6], neg[:6])]
    d = tmp_path / "afqmc"
    d.mkdir()
    jsonl(d / "train.json", train)
    jsonl(d / "dev.json", train)
    jsonl(d / "test.json", [{"id": i, "sentence1": r["sentence1"], "sentence2": r["sentence2"]}
                            for i, r in enumerate(train[:4])])
    run = finetune("afqmc", tmp_path / "run", tokenizer=vocab, data=d,
                   **typed(epochs=1, batch_size=8, seeds=[1]))["runs"][0]
    model = tmp_path / "run" / "seed-1" / "model"
    submission = Path(run["test_submission"])
    assert submission.name == "afqmc_predict.json"
    submitted = submission.read_bytes()
    result = evaluate(model, split="dev", data=d, out=submission.parent)
    assert Path(result["predictions"]).name == "afqmc_dev_predictions.json"
    assert submission.read_bytes() == submitted  # the test submission is untouched
    lines = Path(result["predictions"]).read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(train) and "scores" in result
    result = evaluate(model, split="test", data=d)  # the model folder: CLUE's name
    assert result["predictions"] == str(model / "afqmc_predict.json")
    assert not any(p.name.endswith(".tmp") for p in model.iterdir())
