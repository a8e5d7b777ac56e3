"""Where a run's files live: everything under $WMTP_HOME (default ./.wmtp), and every file name of a run directory.

This module is the only place that spells a run directory's file names; everything else asks a RunLayout.
Imports neither torch nor prefect.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from wmtp_core.config import check_run_name

STEP_DIR = re.compile(r"^step_(\d{8})$")
"""A checkpoint directory's name: step_ and the optimizer step in 8 digits."""


def wmtp_home() -> Path:
    """The absolute home of all run output; $WMTP_HOME when set, else ./.wmtp."""
    return Path(os.environ.get("WMTP_HOME", ".wmtp")).expanduser().resolve()


def runs_dir() -> Path:
    """$WMTP_HOME/runs, where every run has its directory."""
    return wmtp_home() / "runs"


def run_dir(run_name: str) -> Path:
    """$WMTP_HOME/runs/<run_name>; the name is validated, so it cannot escape the home directory."""
    runs = runs_dir()
    path = (runs / check_run_name(run_name)).resolve()
    if path.parent != runs:
        raise ValueError(f"run name {run_name!r} resolves outside {runs}")
    return path


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunLayout:
    """The files of one run directory. A brief rho1 reference is a run of its own inside it (`reference`)."""

    root: Path

    @classmethod
    def of_run(cls, run_name: str) -> RunLayout:
        """The layout of $WMTP_HOME/runs/<run_name> (the name validated)."""
        return cls(run_dir(run_name))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def recipe(self) -> Path:
        """The resolved recipe (what `wmtp resume` starts from, plus any --set)."""
        return self.root / "recipe.yaml"

    @property
    def plan(self) -> Path:
        """The run plan of the newest flow run (wmtp_core.run.plan): what every process of it reads."""
        return self.root / "plan.json"

    @property
    def data(self) -> Path:
        """The copy of a user data file the plan's processes read (on storage every node of the run sees)."""
        return self.root / "data.jsonl"

    @property
    def tracking(self) -> Path:
        """The MLflow run id (a resume continues the same MLflow run)."""
        return self.root / "tracking.json"

    @property
    def summary(self) -> Path:
        """The newest flow run's RunSummary (wmtp_core.run.summary)."""
        return self.root / "summary.json"

    @property
    def pending_metrics(self) -> Path:
        """Metrics MLflow did not take yet (tracking.metrics_buffer); `wmtp upload` sends them."""
        return self.root / "pending_metrics.jsonl"

    @property
    def lock(self) -> Path:
        """The file the one trainer of the run holds an OS lock on (wmtp_core.runtime.run_lock)."""
        return self.root / "train.lock"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint directory of a step (which may not exist)."""
        return self.checkpoints / step_dir_name(step)

    @property
    def reference(self) -> RunLayout:
        """The brief rho1 reference: a run of its own in <run>/reference."""
        return RunLayout(self.root / "reference")

    @property
    def evaluations(self) -> Path:
        """One directory per evaluation: <step dir>-<benchmark>/ with report.json and the completions."""
        return self.root / "evaluations"

    @property
    def torchrun_logs(self) -> Path:
        """Every rank's stdout and stderr, one directory per torchrun job and attempt."""
        return self.root / "logs" / "torchrun"

    def data_ledger(self, rank: int) -> Path:
        """data.ledger: the sample ids of every micro-batch rank trained on, one JSON line each, across resumes."""
        return self.root / "data_ledger" / f"rank{rank}.jsonl"

    @property
    def ray_logs(self) -> Path:
        """Every Ray worker's output, one directory per Ray job and worker-group attempt."""
        return self.root / "logs" / "ray"

    @property
    def ray_result(self) -> Path:
        """Where rank 0 of a Ray job writes its outcome (or the job's driver, when the job failed)."""
        return self.root / "ray_result.json"

    @property
    def torchrun_result(self) -> Path:
        """Where rank 0 of a torchrun job writes its outcome (another rank that fails writes beside it)."""
        return self.root / "torchrun_result.json"

    @property
    def other_nodes(self) -> Path:
        """A manual multi-node torchrun job's command for the other nodes, shell-quoted (the flow's node writes it)."""
        return self.root / "other-nodes.sh"

    @property
    def verify_result(self) -> Path:
        """Where the process `wmtp verify` launches for this run writes its outcome."""
        return self.root / "verify_result.json"
