"""The wmtp-train parameter form as `prefect deploy` builds it from source (no torch, no import of the flow)."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema_from_entrypoint


def _schema() -> dict:
    return parameter_schema_from_entrypoint("flows/train.py:wmtp_train").model_dump()


def test_recipe_phases_and_resume_are_typed_parameters_with_descriptions():
    schema = _schema()
    props = schema["properties"]
    assert list(props) == ["recipe", "phases", "resume"]
    assert props["recipe"]["$ref"] == "#/definitions/Recipe"
    assert {"$ref": "#/definitions/PhaseGates"} in props["phases"]["anyOf"]
    assert all(props[name].get("description") for name in props)


def test_every_form_field_has_a_label_and_the_gates_are_checkboxes():
    definitions = _schema()["definitions"]
    unlabelled = [f"{model}.{field}" for model, d in definitions.items() for field, p in d["properties"].items()
                  if not p.get("description")]
    assert unlabelled == []
    gates = definitions["PhaseGates"]["properties"]
    assert {name: (g["type"], g["default"]) for name, g in gates.items()} == {
        "checkpoint": ("boolean", True), "mps": ("boolean", True), "api": ("boolean", True)}


def test_algorithm_is_a_choice_and_defaults_are_the_embedded_recipe():
    definitions = _schema()["definitions"]
    algorithm = definitions["TrainConfig"]["properties"]["algorithm"]
    assert algorithm["enum"] == ["baseline-mtp", "critic-wmtp", "rho1-wmtp"]
    assert definitions["TrainConfig"]["properties"]["max_steps"]["default"] == 150
