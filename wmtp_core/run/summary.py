"""The run summary: what one flow run of a run did, written by the flows to <run>/summary.json and read back by the
CLI (and --json), `wmtp upload` and the Prefect summary artifact. Imports no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from wmtp_core.config import PhaseGates
from wmtp_core.layout import RunLayout
from wmtp_core.runtime.atomic_files import write_atomically


class EvaluationOutcome(BaseModel):
    """The evaluation of the final checkpoint after training (recipe.evaluation.enabled)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    benchmark: str | None = None
    """What was evaluated (builtin, humaneval or a file)."""
    pass_at_k: dict[str, float] = {}
    """pass@k by k."""
    directory: str | None = None
    """Where the report and the completions are."""
    error: str | None = None
    """Why the evaluation failed ('Type: message'); the trained run is kept, `wmtp evaluate` repeats it."""


class RunSummary(BaseModel):
    """What one flow run of a run did."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_name: str
    """The run (its directory under $WMTP_HOME/runs)."""
    run_dir: str
    """The run directory."""
    status: Literal["completed", "stopped", "failed"]
    """completed: train.max_steps reached; stopped: a time budget, Ctrl-C or SIGTERM stopped it after a save."""
    reason: str | None = None
    """Why it failed ('Type: message', one line)."""
    stop_reason: Literal["time budget", "Ctrl-C", "SIGTERM"] | None = None
    """What stopped it early (status stopped)."""
    steps: int = 0
    """The optimizer step reached (on failure: the newest valid checkpoint's)."""
    initial_eval_loss: float | None = None
    """Eval loss before the first step."""
    final_eval_loss: float | None = None
    """Eval loss at the step reached."""
    final_loss: float | None = None
    """The last training loss reported."""
    latest_checkpoint: str | None = None
    """The newest checkpoint (what a resume continues from)."""
    tokens_per_s: float | None = None
    """Training throughput of this flow run, all processes together."""
    skipped_steps: int | None = None
    """Updates skipped for a non-finite loss or gradient."""
    resumed_from_step: int | None = None
    """The step this flow run resumed from; None for a fresh start."""
    phases: PhaseGates
    """The fix-plan gates the run used."""
    mlflow_run_id: str | None = None
    """The MLflow run (None with tracking off)."""
    mlflow_link: str | None = None
    """The MLflow run's page."""
    uploads: Literal["done", "pending", "tracking off"] = "tracking off"
    """pending: MLflow was unreachable after the retries; `wmtp upload RUN` sends what is owed."""
    uploads_reason: str | None = None
    """Why uploads are pending."""
    evaluation: EvaluationOutcome | None = None
    """The evaluation after training, when recipe.evaluation.enabled."""

    def write(self) -> Path:
        path = RunLayout(Path(self.run_dir)).summary
        write_atomically(path, self.model_dump_json(indent=2))
        return path


def read_summary(layout: RunLayout) -> RunSummary | None:
    """The run's newest summary; None when no flow run has written one."""
    return RunSummary.model_validate_json(layout.summary.read_text()) if layout.summary.is_file() else None
