"""The fix plan's pass rule: the success targets (save and resume 100%, no warnings, no leaked semaphores) apply to
the last rollout stage; earlier stages may miss them. The measuring runs: tests/integration/test_fixplan_flow.py."""

from __future__ import annotations

import pytest

from wmtp_core.fixplan.verification import passed


def _row(stage="p1+p2+p3", **figures):
    return {
        "stage": stage,
        "model": "plain",
        "checkpoint_save_success": 1.0,
        "resume_success": 1.0,
        "warnings": 0,
        "leaked_semaphores": 0,
        **figures,
    }


@pytest.mark.parametrize(
    ("figures", "expected"),
    [
        ({}, True),
        ({"warnings": 1}, False),
        ({"leaked_semaphores": 3}, False),
        ({"checkpoint_save_success": 0.5}, False),
        ({"resume_success": 0.0}, False),
    ],
)
def test_targets_apply_to_the_last_stage(figures, expected):
    assert passed([_row("legacy", warnings=9, leaked_semaphores=14), _row(**figures)]) is expected
