"""The served deployments and prefect.yaml, built without a server: names, schedule, concurrency, configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import WMTP, wmtp_environment

from deployments.served import DEFAULT_RESUME_CRON, served_deployments

ROOT = Path(__file__).resolve().parents[2]


def _by_name(deployments) -> dict:
    return {f"{d.flow_name}/{d.name}": d for d in deployments}


def test_serve_offers_manual_training_scheduled_resume_and_fixplan_verification():
    names = set(_by_name(served_deployments(resume_run="demo")))
    assert names == {"wmtp-train/manual", "wmtp-resume/scheduled", "wmtp-fixplan/verify"}


def test_resume_runs_every_6_hours_and_a_new_run_is_cancelled_while_one_is_active():
    resume = _by_name(served_deployments(resume_run="demo"))["wmtp-resume/scheduled"]
    [schedule] = resume.schedules
    assert DEFAULT_RESUME_CRON == "0 */6 * * *"
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (DEFAULT_RESUME_CRON, "UTC", True)
    assert schedule.parameters == {"run_name": "demo"}
    assert resume.concurrency_limit == 1 and resume.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert resume.entrypoint == "flows/resume.py:wmtp_resume"


def test_resume_cron_and_budget_come_from_configuration():
    resume = _by_name(served_deployments(resume_cron="30 2 * * 1", resume_run="demo", resume_budget_minutes=45))
    [schedule] = resume["wmtp-resume/scheduled"].schedules
    assert schedule.schedule.cron == "30 2 * * 1"
    assert schedule.parameters == {"run_name": "demo", "budget_minutes": 45}


def test_resume_schedule_is_paused_until_it_names_a_run():
    [schedule] = _by_name(served_deployments())["wmtp-resume/scheduled"].schedules
    assert schedule.active is False and schedule.parameters == {}


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"resume_cron": "every six hours"}, "resume cron 'every six hours'"),
        ({"resume_budget_minutes": 0}, "resume budget 0 minutes"),
    ],
)
def test_invalid_resume_settings_are_refused_with_the_setting_named(settings, named):
    with pytest.raises(ValueError, match=named):
        served_deployments(resume_run="demo", **settings)


def test_prefect_yaml_deploys_the_same_three_to_a_process_pool():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert {name: d["entrypoint"] for name, d in deployments.items()} == {
        "manual": "flows/train.py:wmtp_train",
        "scheduled": "flows/resume.py:wmtp_resume",
        "verify": "flows/fixplan.py:wmtp_fixplan",
    }
    resume = deployments["scheduled"]
    assert [s["cron"] for s in resume["schedules"]] == [DEFAULT_RESUME_CRON]
    assert resume["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"wmtp-process"}


def test_serve_needs_a_prefect_server_and_exits_2_without_one(tmp_path):
    out = subprocess.run([WMTP, "serve"], env=wmtp_environment(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "PREFECT_API_URL" in out.stderr


def test_serve_refuses_a_bad_cron_before_contacting_the_server(tmp_path):
    env = wmtp_environment(tmp_path, api_url="http://127.0.0.1:9/api")  # nothing listens there
    out = subprocess.run(
        [WMTP, "serve", "--resume-cron", "61 * * * *"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "resume cron '61 * * * *'" in out.stderr


def test_serving_loads_no_torch():
    code = "import sys, deployments.served; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
