"""Flow `wmtp-fixplan`: measure the fix plan's success metrics for every rollout stage on a plain and an FSDP model."""

from __future__ import annotations

import tempfile
from typing import Literal

from prefect import flow
from prefect.states import Completed, Failed, State

from tasks.fixplan import run_stage, write_report
from wmtp_core.launch.verification import MODELS, STAGES, passed

Stage = Literal["legacy", "p1", "p1+p2", "p1+p2+p3"]
ModelKind = Literal["plain", "fsdp"]


@flow(name="wmtp-fixplan")
def wmtp_fixplan(stages: list[Stage] = list(STAGES), models: list[ModelKind] = list(MODELS)) -> State:
    """Run the built-in tiny recipe for each rollout stage (legacy, +P1, +P2, +P3) and model kind, each in its own
    subprocesses, and check the plan's targets at the last stage: saves 100%, resumes 100%, warnings 0, leaks 0.

    Args:
        stages: Rollout stages to run, in order; the targets apply to the last one.
        models: Model kinds: plain (one process) and fsdp (2 processes under torchrun, CPU gloo here).
    """
    with tempfile.TemporaryDirectory(prefix="wmtp-fixplan-") as workdir:
        rows = [run_stage(stage, model, workdir) for stage in stages for model in models]
    ok = passed(rows, last_stage=stages[-1])
    report = {"stages": rows, "passed": ok, "report": write_report(rows, passed=ok)}
    message = f"fix-plan targets {'met' if ok else 'missed'} at stage {stages[-1]}"
    return Completed(message=message, data=report) if ok else Failed(message=message, data=report)
