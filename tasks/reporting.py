"""Tasks: the artifacts on a flow run's Artifacts tab: the run summary (markdown) and the run's checkpoints (table)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from wmtp_core.checkpoint.manifest import list_checkpoints


def artifact_key(prefix: str, run_name: str) -> str:
    """A Prefect artifact key for a run: lowercase letters, digits and dashes only (Prefect's rule)."""
    return (prefix + "-" + "".join(c if c.isalnum() else "-" for c in run_name.lower()))[:100]


def summary_markdown(summary: dict) -> str:
    """The summary as a small markdown table: the outcome, the figures, where the results are, the gates used."""
    rows = {
        "reason": summary.get("reason"),
        "stopped by": summary.get("stop_reason"),
        "steps": _steps(summary),
        "final training loss": _number(summary.get("final_loss")),
        "eval loss": _eval_losses(summary),
        "tokens/s": _number(summary.get("tokens_per_s"), ".0f"),
        "skipped steps": summary.get("skipped_steps"),
        "checkpoint": f"`{summary['latest_checkpoint']}`" if summary.get("latest_checkpoint") else None,
        "MLflow run": summary.get("mlflow_link") or "tracking off",
        "uploads": summary.get("uploads"),
        "phase gates": ", ".join(f"{name}={'on' if on else 'off'}" for name, on in summary.get("phases", {}).items()),
    }
    title = f"# WMTP run `{summary['run_name']}`: {summary['status']}"
    table = [f"| {name} | {value} |" for name, value in rows.items() if value not in (None, "")]
    return "\n".join([title, "", "| | |", "|---|---|", *table])


def _steps(summary: dict) -> str:
    resumed = summary.get("resumed_from_step")
    return f"{summary.get('steps')}" + (f" (resumed from step {resumed})" if resumed is not None else "")


def _eval_losses(summary: dict) -> str | None:
    initial, final = summary.get("initial_eval_loss"), summary.get("final_eval_loss")
    if final is None:
        return None
    return f"{_number(final)} (at the start: {_number(initial)})" if initial is not None else _number(final)


def _number(value: float | None, spec: str = ".4f") -> str | None:
    return None if value is None else format(value, spec)


@task(name="publish_summary", cache_policy=NO_CACHE)
def publish_summary(summary: dict) -> None:
    """Create the run-summary markdown artifact (key: wmtp-summary-<run>)."""
    create_markdown_artifact(
        summary_markdown(summary), key=artifact_key("wmtp-summary", summary["run_name"]), description="WMTP run summary"
    )


def checkpoint_rows(run_dir: Path) -> list[dict]:
    """One row per checkpoint directory of the run, oldest first (sizes checked; `wmtp checkpoints` checks digests)."""
    rows = []
    for info in list_checkpoints(run_dir, checksums=False):
        size_mb = sum(f.stat().st_size for f in info.path.rglob("*") if f.is_file()) / 2**20
        rows.append(
            {
                "step": info.step,
                "complete": info.valid,
                "size_mb": round(size_mb, 2),
                "path": str(info.path),
                "problem": info.problem or "",
            }
        )
    return rows


@task(name="publish_checkpoints", cache_policy=NO_CACHE)
def publish_checkpoints(run_name: str, run_dir: str) -> None:
    """Create the table artifact of the run's checkpoints (key: wmtp-checkpoints-<run>)."""
    create_table_artifact(
        checkpoint_rows(Path(run_dir)),
        key=artifact_key("wmtp-checkpoints", run_name),
        description=f"Checkpoints of run {run_name} (step, complete, size, path)",
    )
