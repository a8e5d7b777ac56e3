"""`wmtp serve` against a real `prefect server`: a manual training run triggered through the API with custom
parameters, then the scheduled resume deployment continuing it (and cancelling a second run while one is active)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from support import ROOT
from support.cli import WMTP, wmtp_environment
from support.prefect import deployment_named, finished_run

from benchmarks.servers import PrefectServer, stop_process_group

pytestmark = pytest.mark.slow
RUN = "served-e2e"


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server with its own PREFECT_HOME, always stopped (SIGKILL after a grace period)."""
    server = PrefectServer(tmp_path / "prefect-server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def served_home(prefect_server, tmp_path):
    """`wmtp serve` in a subprocess against the server; returns its $WMTP_HOME. Always stopped: SIGTERM (it pauses its
    schedules and exits), SIGKILL after a grace period."""
    home = tmp_path / "home"
    env = wmtp_environment(home, api_url=prefect_server.api_url)
    env.update(PREFECT_HOME=str(tmp_path / "serve-prefect-home"), PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [WMTP, "serve", "--resume-run", RUN],
        cwd=ROOT,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield home
    stop_process_group(process, signal.SIGTERM, grace_s=10)


@pytest.fixture
def client(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as client:
        yield client


def _artifacts(client, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {artifact.key: artifact for artifact in found}


def _log_lines(client, flow_run_id) -> list[tuple[str, int, str]]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.name, log.level, log.message) for log in logs]


def _log_line_where(client, flow_run_id, wanted, timeout_s: float = 30) -> tuple[str, int, str]:
    """The first log line for which wanted(line) holds, polled: the served process ships its logs in batches, so
    they may reach the server a moment after the flow run's final state does."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = _log_lines(client, flow_run_id)
        found = [line for line in lines if wanted(line)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such log line after {timeout_s} s among {len(lines)}: {lines[-5:]}")
        time.sleep(0.5)


def test_served_training_and_scheduled_resume_through_a_real_prefect_server(served_home, client, tiny_recipe):
    recipe = tiny_recipe.model_copy(update={"run": tiny_recipe.run.model_copy(update={"name": RUN})})
    parameters = {"recipe": recipe.model_dump(mode="json"), "phases": {"checkpoint": True, "mps": False, "api": True}}
    train = client.create_flow_run_from_deployment(
        deployment_named(client, "wmtp-train/manual").id, parameters=parameters
    )
    trained = finished_run(client, train.id)
    assert trained.state.is_completed(), trained.state.message
    assert trained.parameters == parameters

    artifacts = _artifacts(client, train.id)
    assert artifacts[f"wmtp-progress-{RUN}"].data == 100.0
    assert [row["step"] for row in json.loads(artifacts[f"wmtp-checkpoints-{RUN}"].data)] == [2, 4]
    summary_md = artifacts[f"wmtp-summary-{RUN}"].data
    for expected in (
        "completed",
        "| steps | 4 |",
        "final training loss",
        "eval loss",
        "tokens/s",
        "step_00000004",
        "/#/experiments/",
        "checkpoint=on, mps=off, api=on",
    ):
        assert expected in summary_md
    # The library's own log, at INFO, in the flow run log.
    _log_line_where(
        client,
        train.id,
        lambda line: line[:2] == ("wmtp_core.training.loop", 20) and line[2].startswith("step 4/4 loss"),
    )

    resume = deployment_named(client, "wmtp-resume/scheduled")
    [schedule] = resume.schedules
    assert (schedule.schedule.cron, schedule.active, schedule.parameters) == ("0 */6 * * *", True, {"run_name": RUN})
    assert resume.global_concurrency_limit.limit == 1
    assert resume.concurrency_options.collision_strategy.value == "CANCEL_NEW"

    more = {"run_name": RUN, "target_steps": 6}
    runs = [client.create_flow_run_from_deployment(resume.id, parameters=more) for _ in range(2)]
    finished = sorted((finished_run(client, run.id) for run in runs), key=lambda run: run.state_name)
    assert [run.state_name for run in finished] == ["Cancelled", "Completed"]  # the second while the first was active
    assert "concurrency limit" in finished[0].state.message
    summary = json.loads((served_home / "runs" / RUN / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (4, 6)
    _log_line_where(client, finished[1].id, lambda line: line[2].endswith("step_00000004 (step 4)"))
