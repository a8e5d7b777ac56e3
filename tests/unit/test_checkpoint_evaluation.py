"""Pieces of a checkpoint's evaluation: prompts cut to fit the model's context keep their end, the decoding figures
of several calls add up over every draft, and the report reads as MLflow metrics with legal names."""

from __future__ import annotations

import re

from wmtp_core.evaluation.checkpoint_evaluation import combined, fit_prompt
from wmtp_core.evaluation.report import evaluation_metrics
from wmtp_core.generation.settings import DecodingStats
from wmtp_core.models.tokenizer import ByteTokenizer


def test_a_long_prompt_is_cut_from_the_left_so_its_end_and_bos_fit():
    prompt = '"""' + "x" * 100 + '\n"""\n'
    fitted = fit_prompt(ByteTokenizer(), prompt, max_tokens=32)
    assert len(fitted.encode()) == 31 and prompt.endswith(fitted)  # 31 bytes + bos = 32 tokens
    assert fit_prompt(ByteTokenizer(), "short", max_tokens=32) == "short"


def test_decoding_figures_of_several_calls_weigh_every_draft():
    first = DecodingStats(
        10, 6, 1.0, 10.0, [1.0, 0.5], drafts_proposed=[2, 2], drafts_accepted=[2, 1], prompts=2, prompt_seconds=0.25
    )
    second = DecodingStats(
        30, 26, 2.0, 15.0, [0.25, 0.0], drafts_proposed=[8, 2], drafts_accepted=[2, 0], prompts=3, prompt_seconds=0.5
    )
    both = combined([first, second])
    assert (both.tokens, both.forward_passes, both.seconds) == (40, 32, 3.0)
    assert both.tokens_per_s == 40 / 3.0
    assert both.acceptance_per_head == [4 / 10, 1 / 4]  # not the mean of the calls' rates
    # After the prompt reads: each read gave one token, the other 35 took the remaining 2.25 s.
    assert (both.prompts, both.prompt_seconds, both.decode_tokens_per_s) == (5, 0.75, 35 / 2.25)


def test_report_metrics_have_names_mlflow_accepts():
    report = {
        "pass_at_k": {"1": 0.5, "10": 0.75},
        "per_head": [{"head": 0, "top1_accuracy": 0.6, "cross_entropy": 1.5}],
        "decoding": {"tokens_per_s": 120.0, "acceptance_per_head": [0.4]},
    }
    metrics = evaluation_metrics(report)
    assert metrics["eval/pass_at_1"] == 0.5 and metrics["eval/acceptance_head_1"] == 0.4
    assert all(re.fullmatch(r"[/\w.\- :]*", name) for name in metrics)  # MLflow's rule: no '@'
