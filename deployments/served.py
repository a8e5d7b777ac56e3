"""The deployments `wmtp serve` serves, built from deployments/catalog.py: wmtp-train/manual, wmtp-resume/scheduled,
wmtp-evaluate/manual and wmtp-fixplan/verify (prefect.yaml describes the same, for a process work pool).

Serving imports only the flow modules (no torch); each flow run executes in its own subprocess, which imports the
flow's module again, so nothing here (nor in flows/) does work at import time.
"""

from __future__ import annotations

import logging

from prefect import Flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Schedule

from deployments import catalog
from deployments.catalog import DEFAULT_RESUME_CRON, RESUME
from flows.evaluate import wmtp_evaluate
from flows.fixplan import wmtp_fixplan
from flows.resume import wmtp_resume
from flows.train import wmtp_train

log = logging.getLogger(__name__)
# Imported by name, not from the catalog's entrypoint strings, so that the layering and light-import checks see them.
FLOWS = (wmtp_train, wmtp_resume, wmtp_evaluate, wmtp_fixplan)


def _concurrency_config(limit: catalog.ConcurrencyLimit) -> ConcurrencyLimitConfig:
    """Prefect's form of a catalog concurrency limit."""
    return ConcurrencyLimitConfig(
        limit=limit.limit, collision_strategy=ConcurrencyLimitStrategy(limit.collision_strategy)
    )


ONE_ACTIVE_RUN = _concurrency_config(catalog.ONE_ACTIVE_RUN)


def _flow_at(entrypoint: str) -> Flow:
    """The imported flow an entrypoint ('flows/train.py:wmtp_train') names, as `prefect deploy` would load it."""
    found = [f for f in FLOWS if f"{f.fn.__module__.replace('.', '/')}.py:{f.fn.__name__}" == entrypoint]
    assert len(found) == 1, f"the catalog names {entrypoint}, which deployments/served.py does not import"
    return found[0]


def resume_schedule(cron: str, *, run_name: str | None, budget_minutes: float | None) -> Schedule:
    """The resume schedule: active for a named run; created paused without one (nothing to resume yet)."""
    parameters = {"run_name": run_name} if run_name else {}
    if budget_minutes is not None:
        if budget_minutes <= 0:
            raise ValueError(
                f"resume budget {budget_minutes} minutes: give a positive number, or none to train to the target"
            )
        parameters["budget_minutes"] = budget_minutes
    try:
        return Cron(cron, timezone=RESUME.schedule.timezone, active=run_name is not None, parameters=parameters)
    except ValueError as error:  # prefect's cron check: 'Invalid cron string: ...'
        raise ValueError(f"resume cron {cron!r}: {error} (e.g. {DEFAULT_RESUME_CRON!r}, every 6 hours)") from None


def _runner_deployment(entry: catalog.Deployment, *, schedules: list[Schedule] | None) -> RunnerDeployment:
    """One catalog entry as a deployment this process serves (schedules None: none, and none cleared)."""
    flow = _flow_at(entry.entrypoint)
    assert flow.name == entry.flow_name, (
        f"{entry.entrypoint} is flow {flow.name!r}, the catalog says {entry.flow_name!r}"
    )
    return flow.to_deployment(
        entry.name,
        description=entry.description,
        tags=list(entry.tags),
        schedules=schedules,
        concurrency_limit=_concurrency_config(entry.concurrency) if entry.concurrency else None,
    )


def served_deployments(
    *, resume_cron: str | None = None, resume_run: str | None = None, resume_budget_minutes: float | None = None
) -> list[RunnerDeployment]:
    """The catalog's deployments (the resume schedule every 6 hours unless resume_cron says otherwise)."""
    schedule = resume_schedule(
        resume_cron or DEFAULT_RESUME_CRON, run_name=resume_run, budget_minutes=resume_budget_minutes
    )
    deployments = [
        _runner_deployment(entry, schedules=[schedule] if entry is RESUME else None) for entry in catalog.DEPLOYMENTS
    ]
    if resume_run is None:
        log.warning("%s: schedule created paused; name the run with --resume-run or WMTP_RESUME_RUN", RESUME.full_name)
    return deployments


def serve_deployments(deployments: list[RunnerDeployment]) -> None:
    """Register the deployments with the Prefect API and execute their runs until stopped (SIGTERM pauses
    the schedules and exits)."""
    serve(*deployments)
