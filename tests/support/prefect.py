"""Reading back what a flow run published on the test server, and waiting for served deployments and their runs."""

from __future__ import annotations

import time


def flow_run_artifact_keys(state) -> list[str]:
    """The keys of the artifacts the flow run behind a returned state created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return [artifact.key for artifact in found]


def deployment_named(client, name: str, timeout_s: float = 120):
    """The deployment `flow/name`, once the serving process has registered it."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def finished_run(client, flow_run_id, timeout_s: float = 150):
    """The flow run, once its state is final."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s} s (state {run.state_name})")
