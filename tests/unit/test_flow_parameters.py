"""The wmtp-train, wmtp-resume and wmtp-evaluate parameter forms as `prefect deploy` builds them from source (no
torch, no import of the flows themselves)."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema_from_entrypoint


def _schema(entrypoint: str = "flows/train.py:wmtp_train") -> dict:
    return parameter_schema_from_entrypoint(entrypoint).model_dump()


def test_recipe_phases_resume_and_plan_file_are_typed_parameters_with_descriptions():
    schema = _schema()
    props = schema["properties"]
    assert list(props) == ["recipe", "phases", "resume", "plan_file"]  # evaluating is recipe.evaluation.enabled
    assert props["recipe"]["$ref"] == "#/definitions/Recipe"
    assert {"$ref": "#/definitions/PhaseGates"} in props["phases"]["anyOf"]
    assert all(props[name].get("description") for name in props)


def test_the_recipe_form_opens_on_the_algorithm_and_steps_the_model_size_and_the_gates():
    definitions = _schema()["definitions"]
    assert list(definitions["Recipe"]["properties"])[:4] == ["train", "model", "phases", "run"]
    assert list(definitions["TrainConfig"]["properties"])[:2] == ["algorithm", "max_steps"]
    size = ["horizon", "num_layers", "d_model", "num_heads"]
    model_fields = list(definitions["ModelConfig"]["properties"])
    assert model_fields.index("horizon") < 4 and all(name in model_fields[:6] for name in size)


def test_the_evaluate_form_takes_a_run_a_step_and_the_evaluation_settings():
    props = _schema("flows/evaluate.py:wmtp_evaluate")["properties"]
    assert list(props) == ["run_name", "step", "evaluation"]
    assert props["run_name"]["pattern"] and props["evaluation"]["$ref"] == "#/definitions/EvaluationConfig"
    assert all(props[name].get("description") for name in props)


def test_every_form_field_has_a_label_and_the_gates_are_checkboxes():
    definitions = _schema()["definitions"]
    unlabelled = [
        f"{model}.{field}"
        for model, d in definitions.items()
        for field, p in d["properties"].items()
        if not p.get("description")
    ]
    assert unlabelled == []
    gates = definitions["PhaseGates"]["properties"]
    assert {name: (g["type"], g["default"]) for name, g in gates.items()} == {
        "checkpoint": ("boolean", True),
        "mps": ("boolean", True),
        "api": ("boolean", True),
    }
    assert all("\n" not in g["description"] and "(off:" in g["description"] for g in gates.values())


def test_algorithm_is_a_choice_and_defaults_are_the_embedded_recipe():
    definitions = _schema()["definitions"]
    algorithm = definitions["TrainConfig"]["properties"]["algorithm"]
    assert algorithm["enum"] == ["baseline-mtp", "critic-wmtp", "rho1-wmtp"]
    assert definitions["TrainConfig"]["properties"]["max_steps"]["default"] == 150


def test_resume_is_latest_a_step_or_a_checkpoint_path_and_empty_for_a_new_run():
    resume = _schema()["properties"]["resume"]
    assert resume["default"] is None
    assert resume["anyOf"] == [
        {"const": "latest", "type": "string", "title": "latest"},
        {"type": "integer", "minimum": 0, "title": "step"},
        {"type": "string", "format": "path", "title": "checkpoint directory"},
        {"type": "null"},
    ]


def test_resume_flow_takes_a_run_name_a_target_and_a_time_budget():
    schema = _schema("flows/resume.py:wmtp_resume")
    props = schema["properties"]
    assert list(props) == ["run_name", "target_steps", "budget_minutes"]
    assert schema["required"] == ["run_name"]
    assert props["run_name"]["type"] == "string" and props["run_name"]["pattern"].startswith("^[A-Za-z0-9]")
    assert props["target_steps"]["default"] is None
    assert {"type": "integer", "exclusiveMinimum": 0} in props["target_steps"]["anyOf"]
    assert {"type": "number", "exclusiveMinimum": 0} in props["budget_minutes"]["anyOf"]
    assert all(props[name].get("description") for name in props)


def test_fixplan_form_offers_stages_and_model_kinds_as_choices():
    props = _schema("flows/fixplan.py:wmtp_fixplan")["properties"]
    assert props["stages"]["default"] == ["legacy", "p1", "p1+p2", "p1+p2+p3"]
    assert props["stages"]["items"]["enum"] == ["legacy", "p1", "p1+p2", "p1+p2+p3"]
    assert props["models"]["items"]["enum"] == ["plain", "fsdp"] and props["models"]["default"] == ["plain", "fsdp"]
    assert props["stages"]["description"] and props["models"]["description"]
