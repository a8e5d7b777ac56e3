"""The evaluation report as MLflow-style metrics (torch-free: the flow's tasks and the CLI read reports).

MLflow allows only letters, digits, `_ - . / :` and spaces in metric names, so pass@k is logged as
`eval/pass_at_<k>`.
"""

from __future__ import annotations


def evaluation_metrics(report: dict) -> dict[str, float]:
    """pass@k, each head's top-1 accuracy and cross-entropy, and decoding speed with its acceptance per head."""
    metrics = {f"eval/pass_at_{k}": value for k, value in report["pass_at_k"].items()}
    for head in report["per_head"]:
        metrics[f"eval/head_{head['head']}_top1_accuracy"] = head["top1_accuracy"]
        metrics[f"eval/head_{head['head']}_cross_entropy"] = head["cross_entropy"]
    decoding = report["decoding"]
    metrics["eval/tokens_per_s"] = decoding["tokens_per_s"]
    if "decode_tokens_per_s" in decoding:  # reports written before 2026-12-01 lack it
        metrics["eval/decode_tokens_per_s"] = decoding["decode_tokens_per_s"]
    for head, rate in enumerate(decoding["acceptance_per_head"], start=1):
        metrics[f"eval/acceptance_head_{head}"] = rate
    return metrics
