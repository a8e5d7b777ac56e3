"""The fix plan's pass rule: the success targets (save and resume 100%, no warnings, no leaked semaphores) apply to
the last rollout stage; earlier stages may miss them. The measuring runs: tests/integration/test_fixplan_flow.py."""

from __future__ import annotations

import pytest
from support.fixplan import report_row

from wmtp_core.launch.verification import passed


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
    assert passed([report_row("legacy", warnings=9, leaked_semaphores=14), report_row(**figures)]) is expected
