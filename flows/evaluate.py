"""Flow `wmtp-evaluate`: what training bought. Find the run's checkpoint, evaluate it (completions of a benchmark
scored in the sandbox, each head on the held-out split, decoding speed with the heads), log the figures to the
run's MLflow run and publish them on the flow run."""

from __future__ import annotations

from prefect import flow

from flows.parameters import CheckpointStep, RunName
from tasks.evaluation import evaluate_model, find_checkpoint, log_evaluation, publish_evaluation
from wmtp_core.config import EvaluationConfig
from wmtp_core.layout import run_dir


@flow(name="wmtp-evaluate", flow_run_name="evaluate-{run_name}")
def wmtp_evaluate(
    run_name: RunName, step: CheckpointStep | None = None, evaluation: EvaluationConfig = EvaluationConfig()
) -> dict:
    """Evaluate a run's checkpoint and record the figures.

    Args:
        run_name: The run under $WMTP_HOME/runs to evaluate.
        step: The checkpoint step; empty for the newest valid checkpoint.
        evaluation: Benchmark, samples per problem, sampling settings and the heads used to decode.
    """
    directory = str(run_dir(run_name))
    return evaluate_run(run_name, directory, find_checkpoint(directory, step), evaluation=evaluation)


def evaluate_run(run_name: str, directory: str, checkpoint: str, *, evaluation: EvaluationConfig) -> dict:
    """The body of wmtp-evaluate once its checkpoint is verified; wmtp-train runs it too (when
    recipe.evaluation.enabled) on its final checkpoint, which training hashed as it wrote it: not hashed again."""
    report = evaluate_model(directory, checkpoint, evaluation)
    log_evaluation(directory, report)
    publish_evaluation(run_name, report)
    return report
