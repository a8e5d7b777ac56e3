"""Flow parameter types beyond the recipe (the recipe and the phase gates are wmtp_core.config models).

Imports neither torch nor prefect, so `prefect deploy` and `wmtp serve` build the UI forms from source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from wmtp_core.config import RUN_NAME_PATTERN

# strict: a JSON `true` must not become step 1
CheckpointStep = Annotated[int, Field(ge=0, strict=True, title="step")]
CheckpointPath = Annotated[Path, Field(title="checkpoint directory")]
Latest = Annotated[Literal["latest"], Field(title="latest")]
ResumeFrom = Latest | CheckpointStep | CheckpointPath
"""Where a run continues: `latest` (its newest valid checkpoint), a step of the run, or a checkpoint directory."""

RunName = Annotated[str, Field(pattern=RUN_NAME_PATTERN)]
TargetSteps = Annotated[int, Field(gt=0)]
BudgetMinutes = Annotated[float, Field(gt=0)]
