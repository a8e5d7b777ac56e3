"""A row of the fix-plan report, as wmtp_core.launch.verification.verify_stage returns it."""

from __future__ import annotations


def report_row(stage: str = "p1+p2+p3", **figures) -> dict:
    """A plain-model row that meets every target unless figures say otherwise."""
    return {
        "stage": stage,
        "model": "plain",
        "checkpoint_save_success": 1.0,
        "resume_success": 1.0,
        "warnings": 0,
        "leaked_semaphores": 0,
        **figures,
    }
