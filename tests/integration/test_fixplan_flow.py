"""`wmtp verify` / the wmtp-fixplan flow: the fix plan's success metrics measured per rollout stage, the JSON contract,
the report under $WMTP_HOME/reports, and a non-zero exit when the last stage misses a target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli import run_wmtp_json
from support.fixplan import report_row

ROW_KEYS = {
    "stage",
    "model",
    "checkpoint_save_success",
    "resume_success",
    "warnings",
    "leaked_semaphores",
    "step_time_s",
}


def _verify(home, api_url, *args: str) -> tuple[int, dict]:
    out, report = run_wmtp_json(["verify", *args], home=home, api_url=api_url)
    assert report is not None, out.stderr[-3000:]
    return out.returncode, report


@pytest.mark.slow
def test_fixed_stage_meets_every_target_and_writes_the_report(prefect_api_url, tmp_path):
    status, report = _verify(tmp_path, prefect_api_url, "--stage", "p1+p2+p3", "--model", "plain")
    assert status == 0 and report["passed"] is True
    (row,) = report["stages"]
    assert ROW_KEYS <= row.keys() and (row["stage"], row["model"]) == ("p1+p2+p3", "plain")
    assert (row["checkpoint_save_success"], row["resume_success"], row["warnings"], row["leaked_semaphores"]) == (
        1,
        1,
        0,
        0,
    )
    assert row["step_time_s"] > 0
    (written,) = (tmp_path / "reports").glob("fixplan-*.json")
    assert json.loads(written.read_text())["stages"] == report["stages"]


@pytest.mark.slow
def test_a_stage_without_phase_3_misses_the_targets_and_exits_1(prefect_api_url, tmp_path):
    status, report = _verify(tmp_path, prefect_api_url, "--stage", "p1", "--model", "plain")
    assert status == 1 and report["passed"] is False
    (row,) = report["stages"]
    assert row["leaked_semaphores"] > 0 and row["warnings"] > 0  # cancelled without cleanup; legacy fp32 autocast


@pytest.mark.slow
def test_report_task_writes_json_and_the_table_and_markdown_artifacts(prefect_api_url, wmtp_home):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.fixplan import write_report

    rows = [
        report_row(
            "legacy", warnings=8, warnings_by_category={"UserWarning": 8}, leaked_semaphores=14, step_time_s=0.05
        ),
        report_row(warnings_by_category={}, step_time_s=0.04),
    ]

    @flow
    def report_only() -> str:
        return write_report(rows, passed=True)

    state = report_only(return_state=True)
    path = state.result()
    assert Path(path).parent == (wmtp_home / "reports").resolve()
    assert json.loads(Path(path).read_text())["stages"] == rows
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    artifacts = {artifact.key: artifact for artifact in found}
    table = artifacts["wmtp-fixplan"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [(row["stage"], row["leaked_semaphores"]) for row in table] == [("legacy", 14), ("p1+p2+p3", 0)]
    assert "PASSED" in artifacts["wmtp-fixplan-summary"].data and path in artifacts["wmtp-fixplan-summary"].data
