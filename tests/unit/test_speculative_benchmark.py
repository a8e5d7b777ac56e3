"""benchmarks/speculative.py keeps working: its --quick mode (tiny model, a few steps and prompts) runs end to end
and reports what the full run reports."""

from __future__ import annotations

import pytest

from benchmarks.speculative import main


@pytest.mark.slow
def test_the_speculative_benchmark_runs_in_quick_mode_and_reports_every_k():
    summary = main(["--quick"])
    for name in ("default", "plateau"):
        result = summary[name]
        assert [h["head"] for h in result["head_accuracy"]] == [0, 1, 2, 3]
        assert result["steps_trained"] >= result["best_step"] > 0 and len(result["curve"]) >= 2
        for k, figures in result["decoding"].items():
            assert figures["equals_greedy"], f"{name}: k={k} differs from greedy"
            assert len(figures["acceptance_per_head"]) == int(k) - 1
            assert figures["tokens_per_s"] > 0 and figures["tokens_per_forward"] >= 1
    assert summary["best_k"] in (2, 3, 4) and summary["best_ratio"] > 0
