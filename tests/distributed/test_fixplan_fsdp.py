"""`wmtp verify` for FSDP over two processes: at the last rollout stage every fix-plan target is met (the plain model,
the report and the failing stages: tests/integration/test_fixplan_flow.py)."""

from __future__ import annotations

import pytest
from support.cli import run_wmtp_json

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_fsdp_on_two_processes_meets_every_target_at_the_last_stage(prefect_api_url, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # what the processes leave in the temporary directory
    out, report = run_wmtp_json(
        ["verify", "--stage", "p1+p2+p3", "--model", "fsdp"], home=tmp_path, api_url=prefect_api_url
    )
    assert report is not None, out.stderr[-3000:]
    (row,) = report["stages"]
    assert out.returncode == 0 and report["passed"] is True, row
    assert not list(temp.glob("torchelastic_*")), "torchrun left its error-file directory in the temp dir"
