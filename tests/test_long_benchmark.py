"""benchmarks/long.py at tiny sizes: every variant's cell runs, and the table prints."""

from benchmarks.long import VARIANTS, print_table, run_cell


def test_cells_run_at_tiny_sizes(capsys):
    results = {}
    for variant in VARIANTS:  # L = 64: 4 blocks of the window 16, 4 XL segments of 16
        cell = run_cell(variant, 64, window=16, segment=16, memory=16, vocab=200, repeats=1)
        assert cell["seconds"] > 0 and cell["peak_mib"] >= 0, (variant, cell)
        results[variant, 64] = cell
    results["full", 128] = run_cell("full", 128, vocab=200, repeats=1, limit_s=0.0)
    assert "skipped" in results["full", 128]
    print_table(results, [64, 128], limit=0.0)
    table = capsys.readouterr().out
    assert "| 64 |" in table and "skipped: >0 s" in table
