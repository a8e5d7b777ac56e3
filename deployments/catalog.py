"""The deployments WMTP offers, each described once: `wmtp serve` builds them from here (deployments/served.py) and
a unit test holds prefect.yaml to the same. Plain data: it imports neither Prefect nor the flows.

Deployment names are a public contract (DESIGN.md section 3): wmtp-train/manual, wmtp-resume/scheduled,
wmtp-evaluate/manual and wmtp-fixplan/verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_RESUME_CRON = "0 */6 * * *"  # every 6 hours


@dataclass(frozen=True)
class CronSchedule:
    """When a deployment runs by itself. The run it continues is configuration, not catalog: `wmtp serve
    --resume-run` (or WMTP_RESUME_RUN), which prefect.yaml reads as `{{ $WMTP_RESUME_RUN }}`."""

    cron: str
    timezone: str


@dataclass(frozen=True)
class ConcurrencyLimit:
    """How many runs of the deployment may be active at once, and what happens to one more."""

    limit: int
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"]


@dataclass(frozen=True)
class Deployment:
    """One deployment: the flow it runs (by name and by entrypoint, as prefect.yaml names it) and how it runs."""

    flow_name: str
    name: str
    entrypoint: str
    description: str
    tags: tuple[str, ...] = ("wmtp",)
    schedule: CronSchedule | None = None
    concurrency: ConcurrencyLimit | None = None

    @property
    def full_name(self) -> str:
        """The name Prefect's UI, API and `run_deployment` use: flow/deployment."""
        return f"{self.flow_name}/{self.name}"


# A resume that would start while another is active is cancelled, never queued: two trainers on one run would fight.
ONE_ACTIVE_RUN = ConcurrencyLimit(limit=1, collision_strategy="CANCEL_NEW")

TRAIN = Deployment(
    flow_name="wmtp-train",
    name="manual",
    entrypoint="flows/train.py:wmtp_train",
    description="Train a run from the parameter form.",
)
RESUME = Deployment(
    flow_name="wmtp-resume",
    name="scheduled",
    entrypoint="flows/resume.py:wmtp_resume",
    description="Continue a run from its newest valid checkpoint (covers crashed runs).",
    schedule=CronSchedule(cron=DEFAULT_RESUME_CRON, timezone="UTC"),
    concurrency=ONE_ACTIVE_RUN,
)
EVALUATE = Deployment(
    flow_name="wmtp-evaluate",
    name="manual",
    entrypoint="flows/evaluate.py:wmtp_evaluate",
    description="Evaluate a run's checkpoint: pass@k, per-head accuracy, decoding.",
)
FIXPLAN = Deployment(
    flow_name="wmtp-fixplan",
    name="verify",
    entrypoint="flows/fixplan.py:wmtp_fixplan",
    description="Measure the fix plan's acceptance figures for each rollout stage.",
)
DEPLOYMENTS = (TRAIN, RESUME, EVALUATE, FIXPLAN)
