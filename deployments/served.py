"""The deployments `wmtp serve` serves: wmtp-train/manual, wmtp-resume/scheduled, wmtp-evaluate/manual and
wmtp-fixplan/verify.

Serving imports only the flow modules (no torch); each flow run executes in its own subprocess, which imports the
flow's module again, so nothing here (nor in flows/) does work at import time.
"""

from __future__ import annotations

import logging

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Schedule

from flows.evaluate import wmtp_evaluate
from flows.fixplan import wmtp_fixplan
from flows.resume import wmtp_resume
from flows.train import wmtp_train

log = logging.getLogger(__name__)
DEFAULT_RESUME_CRON = "0 */6 * * *"  # every 6 hours, UTC
# One active resume per deployment: a run that would start while another is active is cancelled, never queued.
ONE_ACTIVE_RUN = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


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
        return Cron(cron, timezone="UTC", active=run_name is not None, parameters=parameters)
    except ValueError as error:  # prefect's cron check: 'Invalid cron string: ...'
        raise ValueError(f"resume cron {cron!r}: {error} (e.g. {DEFAULT_RESUME_CRON!r}, every 6 hours)") from None


def served_deployments(
    *, resume_cron: str | None = None, resume_run: str | None = None, resume_budget_minutes: float | None = None
) -> list[RunnerDeployment]:
    """The four deployments (the resume schedule every 6 hours unless resume_cron says otherwise)."""
    schedule = resume_schedule(
        resume_cron or DEFAULT_RESUME_CRON, run_name=resume_run, budget_minutes=resume_budget_minutes
    )
    deployments = [
        wmtp_train.to_deployment("manual", description="Train a run from the parameter form.", tags=["wmtp"]),
        wmtp_resume.to_deployment(
            "scheduled",
            schedules=[schedule],
            concurrency_limit=ONE_ACTIVE_RUN,
            tags=["wmtp"],
            description="Continue a run from its newest valid checkpoint (covers crashed runs).",
        ),
    ]
    deployments.append(
        wmtp_evaluate.to_deployment(
            "manual", tags=["wmtp"], description="Evaluate a run's checkpoint: pass@k, per-head accuracy, decoding."
        )
    )
    deployments.append(
        wmtp_fixplan.to_deployment(
            "verify", tags=["wmtp"], description="Measure the fix plan's acceptance figures for each rollout stage."
        )
    )
    if resume_run is None:
        log.warning("wmtp-resume/scheduled: schedule created paused; name the run with --resume-run or WMTP_RESUME_RUN")
    return deployments


def serve_deployments(deployments: list[RunnerDeployment]) -> None:
    """Register the deployments with the Prefect API and execute their runs until stopped (SIGTERM pauses
    the schedules and exits)."""
    serve(*deployments)
