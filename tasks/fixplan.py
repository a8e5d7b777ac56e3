"""Tasks of the fix-plan verification: one rollout stage per task run, then the report and its artifacts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from wmtp_core.launch.verification import TARGETS, verify_stage
from wmtp_core.layout import wmtp_home
from wmtp_core.runtime.atomic_files import write_atomically

COLUMNS = (
    "stage",
    "model",
    "checkpoint_save_success",
    "resume_success",
    "warnings",
    "leaked_semaphores",
    "step_time_s",
)


@task(name="verify_stage", cache_policy=NO_CACHE)
def run_stage(stage: str, model: str, workdir: str) -> dict:
    """Train, cancel and resume one stage on one model kind in subprocesses; returns its row of the report."""
    row = verify_stage(stage, model, Path(workdir))
    get_run_logger().info("%s / %s: %s", stage, model, ", ".join(f"{k}={row[k]}" for k in COLUMNS[2:]))
    return row


@task(name="write_report", cache_policy=NO_CACHE)
def write_report(rows: list[dict], *, passed: bool) -> str:
    """The JSON report under $WMTP_HOME/reports, plus a table and a markdown artifact; returns the report's path."""
    report = {"stages": rows, "passed": passed, "targets": TARGETS}
    path = wmtp_home() / "reports" / f"fixplan-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(report, indent=2))
    create_table_artifact(
        [{name: row[name] for name in COLUMNS} for row in rows],
        key="wmtp-fixplan",
        description="Fix-plan success metrics per rollout stage and model kind",
    )
    create_markdown_artifact(
        report_markdown(rows, passed=passed, path=path),
        key="wmtp-fixplan-summary",
        description="Fix-plan verification verdict",
    )
    return str(path)


def report_markdown(rows: list[dict], *, passed: bool, path: Path) -> str:
    header = "| " + " | ".join(COLUMNS) + " | warnings by category |"
    lines = [
        f"# Fix-plan verification: {'PASSED' if passed else 'FAILED'}",
        "",
        "Targets at the last stage: checkpoint save success 100%, resume 100%, warnings 0, leaked semaphores 0.",
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [str(row[name]) for name in COLUMNS] + [json.dumps(row["warnings_by_category"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"Report: `{path}`"])
