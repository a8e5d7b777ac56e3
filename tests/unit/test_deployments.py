"""The served deployments and prefect.yaml, built without a server: names, schedule, concurrency, configuration."""

from __future__ import annotations

import pytest
import yaml
from support import ROOT

from deployments.served import DEFAULT_RESUME_CRON, served_deployments


def _by_name(deployments) -> dict:
    return {f"{d.flow_name}/{d.name}": d for d in deployments}


def test_serve_offers_manual_training_scheduled_resume_and_fixplan_verification():
    names = set(_by_name(served_deployments(resume_run="demo")))
    assert names == {"wmtp-train/manual", "wmtp-resume/scheduled", "wmtp-evaluate/manual", "wmtp-fixplan/verify"}


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
