"""The installed `wmtp` console script refuses invalid input in its own process: exit 2 and one line on stderr, before
any server is contacted or started (the in-process CLI contract is in tests/unit/test_cli.py)."""

from __future__ import annotations

import subprocess

from support.cli import WMTP, wmtp_environment


def test_console_script_reports_bad_override_in_one_line(tmp_path):
    out = subprocess.run(
        [WMTP, "train", "--set", "train.lr=-1"],
        env=wmtp_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: train.lr: Input should be greater than 0 (got '-1')"


def test_serve_needs_a_prefect_server_and_exits_2_without_one(tmp_path):
    out = subprocess.run([WMTP, "serve"], env=wmtp_environment(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "PREFECT_API_URL" in out.stderr


def test_serve_refuses_a_bad_cron_before_contacting_the_server(tmp_path):
    env = wmtp_environment(tmp_path, api_url="http://127.0.0.1:9/api")  # nothing listens there
    out = subprocess.run(
        [WMTP, "serve", "--resume-cron", "61 * * * *"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "resume cron '61 * * * *'" in out.stderr
