"""The served deployments and prefect.yaml, built without a server: names, schedule, concurrency, configuration, and
the two agreeing."""

from __future__ import annotations

import os
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values
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


def prefect_yaml_view(path: Path, *, resume_run: str) -> dict[str, dict]:
    """Each deployment of a prefect.yaml as `WMTP_RESUME_RUN=resume_run prefect deploy --all` reads it: templates
    filled from the environment by Prefect's own apply_values, the flow name from loading the entrypoint."""
    config = yaml.safe_load(path.read_text())
    with patch.dict(os.environ, {"WMTP_RESUME_RUN": resume_run}):
        entries = apply_values(config["deployments"], os.environ, remove_notset=False)
    view = {}
    for entry in entries:
        full_name = f"{load_flow_from_entrypoint(str(ROOT / entry['entrypoint'])).name}/{entry['name']}"
        assert full_name not in view, f"{path} holds {full_name} twice"
        limit = entry.get("concurrency_limit") or {}
        limit = {"limit": limit} if isinstance(limit, int) else limit
        view[full_name] = {
            "entrypoint": entry["entrypoint"],
            "description": entry.get("description"),
            "tags": entry.get("tags", []),
            "parameters": entry.get("parameters", {}),
            "schedules": [
                (s["cron"], s.get("timezone"), s.get("active", True), s.get("parameters", {}))
                for s in entry.get("schedules", [])
            ],
            "concurrency": (limit.get("limit"), limit.get("collision_strategy")),
        }
    return view


def served_view(deployments) -> dict[str, dict]:
    """The same fields of the deployments `wmtp serve` registers."""
    return {
        f"{d.flow_name}/{d.name}": {
            "entrypoint": d.entrypoint,
            "description": d.description,
            "tags": d.tags,
            "parameters": d.parameters,
            "schedules": [(s.schedule.cron, s.schedule.timezone, s.active, s.parameters) for s in d.schedules or []],
            "concurrency": (
                d.concurrency_limit,
                d.concurrency_options.collision_strategy.value if d.concurrency_options else None,
            ),
        }
        for d in deployments
    }


def prefect_yaml_disagreements(path: Path, *, resume_run: str = "demo") -> list[str]:
    """One line per disagreement between a prefect.yaml and `wmtp serve --resume-run resume_run`: a deployment only
    one of them has, or a field they give differently."""
    from_yaml = prefect_yaml_view(path, resume_run=resume_run)
    served = served_view(served_deployments(resume_run=resume_run))
    lines = [f"{name}: only in wmtp serve" for name in served.keys() - from_yaml.keys()]
    lines += [f"{name}: only in {path.name}" for name in from_yaml.keys() - served.keys()]
    for name in from_yaml.keys() & served.keys():
        lines += [
            f"{name} {field}: {path.name} {value!r}, wmtp serve {served[name][field]!r}"
            for field, value in from_yaml[name].items()
            if value != served[name][field]
        ]
    return sorted(lines)


def test_prefect_yaml_and_wmtp_serve_describe_the_same_deployments():
    """Deployment names are a public contract and both files state them, so they must agree on name, flow
    (entrypoint), description, tags, default parameters, schedules and concurrency. prefect.yaml templates the
    resume schedule's run_name from $WMTP_RESUME_RUN; both sides get the same run name (as `WMTP_RESUME_RUN=demo
    prefect deploy --all` and `wmtp serve --resume-run demo` would), so the schedule parameters compare by value,
    not just by key."""
    differences = prefect_yaml_disagreements(ROOT / "prefect.yaml")
    assert not differences, "prefect.yaml and wmtp serve (deployments/catalog.py) disagree:\n" + "\n".join(differences)


def test_the_agreement_check_reports_a_missing_deployment_and_a_changed_schedule(tmp_path):
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    config["deployments"] = [d for d in config["deployments"] if d["entrypoint"] != "flows/evaluate.py:wmtp_evaluate"]
    next(d for d in config["deployments"] if d["name"] == "scheduled")["schedules"][0]["cron"] = "0 * * * *"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(config))
    differences = prefect_yaml_disagreements(tmp_path / "prefect.yaml")
    assert differences == [
        "wmtp-evaluate/manual: only in wmtp serve",
        "wmtp-resume/scheduled schedules: prefect.yaml [('0 * * * *', 'UTC', True, {'run_name': 'demo'})], "
        "wmtp serve [('0 */6 * * *', 'UTC', True, {'run_name': 'demo'})]",
    ]


def test_prefect_yaml_sends_every_deployment_to_the_process_pool():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["work_pool"]["name"] for d in config["deployments"]} == {"wmtp-process"}
