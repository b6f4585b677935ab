"""`motian inspect-batch --recipe NAME` shows what that recipe trains on (the guide showed the
motian preset while the demo recipe trains with BERT token masking)."""

from __future__ import annotations

import re

from motian.cli import main


def test_inspect_batch_recipe_shows_the_recipes_masking(pd98_encoded, capsys, tmp_path):
    assert main(["inspect-batch", "--data", str(pd98_encoded), "--recipe", "demo",
                 "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "recipe demo, its first step (training documents): masking bert, strategy token, " \
           "rate 0.15, pair task none, L=128, seed 0" in out
    rows = re.findall(r"^#\d+: (\d+) of (\d+) tokens masked \(([^)]*)\)", out, re.M)
    assert len(rows) == 3
    masked, content = sum(int(r[0]) for r in rows), sum(int(r[1]) for r in rows)
    assert 0.10 < masked / content < 0.20  # BERT's 15%
    body = out.split("legend:", 1)[1].split("\n", 1)[1]
    assert "⇒" not in body and all("synonym" not in r[2] for r in rows)  # no Cilin synonyms
    # The motian preset, for contrast, replaces words with synonyms.
    assert main(["inspect-batch", "--data", str(pd98_encoded), "--examples", "3"]) == 0
    assert "preset motian" in capsys.readouterr().out

    # A recipe decides the masking: an option that would contradict it is refused.
    assert main(["inspect-batch", "--data", str(pd98_encoded), "--recipe", "demo",
                 "--preset", "wwm"]) == 1
    assert "--recipe demo decides preset" in capsys.readouterr().err
