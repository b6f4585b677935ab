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


def test_eager_full_attention_is_the_same_model_through_the_materialising_kernel():
    import torch

    from benchmarks.long import EAGER, build_step

    fused, eager = (build_step(v, 64, 16, 16, 16, 200) for v in ("full", EAGER))
    assert abs(fused() - eager()) < 1e-5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_softmax" in ops  # the (heads, L, L) probabilities are spelled out
    assert not any("flash_attention" in op for op in ops)
