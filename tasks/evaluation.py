"""Tasks: evaluate a run's checkpoint (generation, the sandbox, per-head scores, decoding speed), log the figures to
the run's own MLflow run, and publish them on the flow run (a table and a few completions)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.reporting import artifact_key
from wmtp_core.config import EvaluationConfig
from wmtp_core.evaluation.report import evaluation_metrics
from wmtp_core.layout import RunLayout
from wmtp_core.run.start import choose_checkpoint

EXAMPLES_SHOWN = 3  # completions in the markdown artifact


@task(name="find_checkpoint", cache_policy=NO_CACHE)
def find_checkpoint(run_dir: str, step: int | None) -> str:
    """The run's checkpoint at step (verified), or its newest valid one; CheckpointError says what to change."""
    return str(choose_checkpoint(RunLayout(Path(run_dir)), step, continuing=False, option="step").checkpoint)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(run_dir: str, checkpoint: str, evaluation: EvaluationConfig) -> dict:
    """Evaluate the checkpoint (verified by the caller: find_checkpoint, or training as it wrote it); the report
    comes back (and is in <run>/evaluations/<step>-<benchmark>/report.json)."""
    from wmtp_core.evaluation.checkpoint_evaluation import evaluate_checkpoint  # torch loads here

    logger = get_run_logger()
    progress = _every_tenth(lambda stage, done, total: logger.info("%s: %d/%d", stage, done, total))
    report = evaluate_checkpoint(
        Path(checkpoint), evaluation, runs_under=Path(run_dir), verified=True, on_progress=progress
    )
    logger.info("evaluation of %s: %s", Path(checkpoint).name, json.dumps(evaluation_metrics(report)))
    return report


@task(name="log_evaluation", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_evaluation(run_dir: str, report: dict) -> str | None:
    """The figures as eval/* metrics at the checkpoint's step on the run's MLflow run; None when tracking was off."""
    recorded = RunLayout(Path(run_dir)).tracking
    if not recorded.is_file():
        get_run_logger().info("run has no MLflow run (tracking.enabled false): evaluation metrics not logged")
        return None
    from tracking.client import point_sender

    run_id = json.loads(recorded.read_text())["mlflow_run_id"]
    stamp = int(time.time() * 1000)
    points = [(key, value, stamp, report["step"]) for key, value in evaluation_metrics(report).items()]
    point_sender(run_id)(points)
    return run_id


@task(name="publish_evaluation", cache_policy=NO_CACHE)
def publish_evaluation(run_name: str, report: dict) -> None:
    """A table artifact of every figure and a markdown artifact with a few completions (keys name the run)."""
    rows = [{"figure": key, "value": round(value, 4)} for key, value in evaluation_metrics(report).items()]
    create_table_artifact(
        rows,
        key=artifact_key("wmtp-evaluation", run_name),
        description=f"Evaluation of {run_name} at step {report['step']} on {report['benchmark']}",
    )
    create_markdown_artifact(
        completions_markdown(report),
        key=artifact_key("wmtp-completions", run_name),
        description=f"Completions of {run_name} at step {report['step']}",
    )


def completions_markdown(report: dict) -> str:
    lines = [f"# `{report['benchmark']}` at step {report['step']}: pass@1 {report['pass_at_k'].get('1', 0.0):.3f}"]
    for example in report["examples"][:EXAMPLES_SHOWN]:
        lines += [
            "",
            f"## {example['task_id']}: {example['status']}",
            "",
            "```python",
            example["prompt"] + example["completion"],
            "```",
        ]
    return "\n".join(lines)


def _every_tenth(report):
    """A progress callback that passes on about every tenth report of each stage (and its last)."""

    def on_progress(stage: str, done: int, total: int) -> None:
        if done == total or done % max(total // 10, 1) == 0:
            report(stage, done, total)

    return on_progress
