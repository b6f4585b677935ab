"""The downstream plot zooms its axis to the scores (on 0-100, 93.5 and 94.6 looked alike) and
draws a classification task's majority-class floor as a line, not as one more arm."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from motian.reporting.run import MAJORITY_ARM, DownstreamRow, downstream_ylim, plot_downstream


def _row(arm: str, task: str, mean: float, std: float) -> DownstreamRow:
    return DownstreamRow(arm, task, "test", "accuracy", mean, std, 3, Path("results.json"))


def test_the_axis_is_zoomed_to_the_scores_and_the_floor(tmp_path):
    rows = [_row("pretrained", "errors", 0.946, 0.003), _row("random init", "errors", 0.935,
                                                                0.002)]
    lo, hi = downstream_ylim(rows, {})
    assert 92.0 < lo < 93.3 and 94.9 < hi < 96.5  # 1.1 points apart fill most of the axis
    lo, hi = downstream_ylim(rows, {"errors": 73.4})
    assert 69.0 < lo < 73.4 and 94.9 < hi < 99.0  # the floor is in view
    assert downstream_ylim([_row("a", "t", 0.995, 0.01)], {}) == (downstream_ylim(
        [_row("a", "t", 0.995, 0.01)], {})[0], 100.0)  # never above 100

    # A results.json's majority-class arm becomes a line (rendered: a valid, readable PNG).
    floor = _row(MAJORITY_ARM, "errors", 0.734, 0.0)
    path = plot_downstream(rows + [floor, _row("pretrained", "ner", 0.42, 0.01)],
                           tmp_path / "downstream.png")
    image = Image.open(path)
    image.verify()
    assert image.size[0] > 300 and image.size[1] > 200
