"""Reading back what a flow run published on the test server."""

from __future__ import annotations


def flow_run_artifact_keys(state) -> list[str]:
    """The keys of the artifacts the flow run behind a returned state created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return [artifact.key for artifact in found]
