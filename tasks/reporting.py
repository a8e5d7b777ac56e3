"""Task: the markdown run summary shown on the flow run's Artifacts tab."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE


def summary_markdown(summary: dict) -> str:
    """The summary as a small markdown table (one row per field, failures first)."""
    rows = [f"| {key} | {value} |" for key, value in summary.items() if key != "phases"]
    gates = ", ".join(f"{name}={'on' if on else 'off'}" for name, on in summary.get("phases", {}).items())
    title = f"# WMTP run `{summary['run_name']}`: {summary['status']}"
    return "\n".join([title, "", "| field | value |", "|---|---|", *rows, f"| phase gates | {gates} |"])


@task(name="publish_summary", cache_policy=NO_CACHE)
def publish_summary(summary: dict) -> None:
    """Create the run-summary markdown artifact (key: wmtp-summary-<run>)."""
    key = "wmtp-summary-" + "".join(c if c.isalnum() else "-" for c in summary["run_name"].lower())
    create_markdown_artifact(summary_markdown(summary), key=key[:100], description="WMTP run summary")
