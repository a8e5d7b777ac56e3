"""wmtp_core.config and wmtp_core.recipes: YAML loading, `--set` overrides, validation messages and the UI schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from wmtp_core.config import Recipe, RecipeError, RunConfig, check_run_name, with_run_name
from wmtp_core.recipes import flatten_recipe, load_recipe, recipe_to_yaml

PUBLIC_KEYS = [
    "run.name",
    "seed",
    "train.algorithm",
    "train.max_steps",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.eval_every",
    "train.lr",
    "train.grad_accumulation_steps",
    "data.batch_size",
    "data.path",
    "data.num_workers",
    "model.horizon",
    "phases.checkpoint",
    "phases.mps",
    "phases.api",
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_recipe_sets_fields_and_keeps_defaults_elsewhere(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.01\n  algorithm: rho1-wmtp\nmodel:\n  horizon: 3\nseed: 5\n")
    recipe = load_recipe(path)
    assert (recipe.train.lr, recipe.train.algorithm, recipe.model.horizon, recipe.seed) == (0.01, "rho1-wmtp", 3, 5)
    assert recipe.train.max_steps == Recipe().train.max_steps


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_recipe(_write(tmp_path, "")) == Recipe()


def test_overrides_apply_on_top_of_the_yaml_file(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.01\n  max_steps: 20\n")
    recipe = load_recipe(path, ["train.lr=1e-3"])
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.train.max_steps == 20


@pytest.mark.parametrize(
    ("override", "read", "expected"),
    [
        ("train.lr=1e-3", lambda r: r.train.lr, 1e-3),
        ("train.lr=0.5", lambda r: r.train.lr, 0.5),
        ("tracking.enabled=false", lambda r: r.tracking.enabled, False),
        ("phases.mps=False", lambda r: r.phases.mps, False),
        ("phases.api=true", lambda r: r.phases.api, True),
        ("train.max_steps=12", lambda r: r.train.max_steps, 12),
        ("seed=3", lambda r: r.seed, 3),
        ("train.lr_decay_steps=null", lambda r: r.train.lr_decay_steps, None),
        ("data.path=null", lambda r: r.data.path, None),
        ("data.path=data/x.jsonl", lambda r: r.data.path, Path("data/x.jsonl")),
        ("run.tags=[a, b]", lambda r: r.run.tags, ["a", "b"]),
        ("run.name=my-run_1.0", lambda r: r.run.name, "my-run_1.0"),
        ("train.algorithm=critic-wmtp", lambda r: r.train.algorithm, "critic-wmtp"),
    ],
)
def test_override_values_are_coerced_to_the_field_type(override, read, expected):
    value = read(load_recipe(None, [override]))
    assert value == expected
    assert type(value) is type(expected)


def test_later_override_of_the_same_key_wins():
    assert load_recipe(None, ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_unknown_key_error_names_the_key_and_the_section_keys():
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, ["train.lrr=1"])
    message = str(caught.value)
    assert "train.lrr" in message
    for known in ("algorithm", "max_steps", "lr", "keep_last", "grad_accumulation_steps"):
        assert known in message


def test_unknown_top_level_key_lists_the_sections():
    with pytest.raises(RecipeError, match="foo.*train, model, phases, run, seed"):
        load_recipe(None, ["foo=1"])


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"^train\.lrr"):
        load_recipe(_write(tmp_path, "train:\n  lrr: 0.1\n"))


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(None, ["train.lr"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=-1", "train.lr"),
        ("model.horizon=0", "model.horizon"),
        ("train.algorithm=nope", "train.algorithm"),
        ("train.keep_last=1", "train.keep_last"),
        ("data.batch_size=0", "data.batch_size"),
        ("tracking.enabled=maybe", "tracking.enabled"),
        ("model.d_model=30", "model.d_model"),
    ],
)
def test_invalid_value_error_starts_with_the_dotted_field_name(override, field):
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, [override])
    assert str(caught.value).startswith(field)


def test_every_problem_is_listed_at_once():
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, ["train.lrr=1", "train.lr=-1", "model.horizon=0"])
    problems = str(caught.value).split("; ")
    assert len(problems) == 3
    assert "unknown recipe key 'train.lrr'" in problems[0]  # override keys first, then fields in recipe order
    assert problems[1].startswith("train.lr") and problems[2].startswith("model.horizon")


def test_heads_not_dividing_width_error_names_both_fields():
    with pytest.raises(RecipeError, match=r"model\.d_model \(30\).*model\.num_heads \(4\)"):
        load_recipe(None, ["model.d_model=30", "model.num_heads=4"])


def test_several_processes_with_the_single_strategy_are_refused_before_anything_starts():
    with pytest.raises(RecipeError, match="devices.strategy=single trains one; set devices.strategy=ddp or fsdp"):
        load_recipe(None, ["devices.nproc_per_node=2"])
    assert load_recipe(None, ["devices.nproc_per_node=2", "devices.strategy=ddp"]).devices.nproc_per_node == 2


def test_warmup_longer_than_training_is_rejected():
    with pytest.raises(RecipeError, match=r"train\.warmup_steps.*train\.max_steps"):
        load_recipe(None, ["train.warmup_steps=20", "train.max_steps=10"])


def test_missing_recipe_file_error_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=str(missing)):
        load_recipe(missing)


def test_malformed_yaml_error_names_the_file(tmp_path):
    path = _write(tmp_path, "train: [unclosed\n  lr: 1\n")
    with pytest.raises(RecipeError, match="not valid YAML") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/abs", "", ".hidden", "a\\b", "x" * 65, "a b"])
def test_check_run_name_rejects_path_escapes_and_odd_names(name):
    with pytest.raises(RecipeError):
        check_run_name(name)


@pytest.mark.parametrize("name", ["run1\n", "run1\r\n", "run\t1", "\x1brun1", "run1\x7f", "run1\x00"])
def test_run_name_with_a_control_character_is_refused_with_what_to_remove(name):
    with pytest.raises(RecipeError, match="control character .* remove it"):
        check_run_name(name)
    with pytest.raises(ValidationError, match="control character .* remove it"):
        RunConfig(name=name)


@pytest.mark.parametrize("name", ["run1", "baseline-mtp-20250101-120000", "a.b_c-d", "x" * 64])
def test_check_run_name_accepts_safe_names(name):
    assert check_run_name(name) == name


def test_run_name_with_path_escape_is_rejected_in_a_recipe():
    with pytest.raises(RecipeError, match=r"^run\.name"):
        load_recipe(None, ["run.name=../x"])


def test_with_run_name_validates_and_sets_the_name():
    assert with_run_name(Recipe(), "ok-1").run.name == "ok-1"
    with pytest.raises(RecipeError):
        with_run_name(Recipe(), "a/b")


def test_flatten_recipe_has_dotted_string_values_for_every_public_key():
    flat = flatten_recipe(load_recipe(None, ["train.lr=1e-3", "seed=9"]))
    assert set(PUBLIC_KEYS) <= set(flat)
    assert flat["train.lr"] == "0.001"
    assert flat["seed"] == "9"
    assert flat["run.name"] == "None"
    assert all(isinstance(value, str) for value in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values())


def test_recipe_yaml_round_trips(tmp_path):
    recipe = load_recipe(None, ["train.lr=1e-3", "run.tags=[a, b]", "data.path=x.jsonl"])
    assert load_recipe(_write(tmp_path, recipe_to_yaml(recipe))) == recipe


@pytest.mark.parametrize("key", PUBLIC_KEYS)
def test_public_key_exists(key):
    node = Recipe()
    for part in key.split("."):
        assert part in type(node).model_fields, key
        node = getattr(node, part)


def _sections(schema: dict) -> dict[str, dict]:
    return {"Recipe": schema, **schema["$defs"]}


def test_schema_has_a_description_for_every_field_of_every_section():
    sections = _sections(Recipe.model_json_schema())
    expected = {"Recipe"} | {
        f.annotation.__name__
        for f in Recipe.model_fields.values()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    assert expected <= set(sections)
    missing = [
        f"{name}.{field}"
        for name, section in sections.items()
        for field, prop in section["properties"].items()
        if not prop.get("description", "").strip()
    ]
    assert missing == []


def test_schema_offers_the_algorithms_as_an_enum():
    algorithm = Recipe.model_json_schema()["$defs"]["TrainConfig"]["properties"]["algorithm"]
    assert set(algorithm["enum"]) == {"baseline-mtp", "critic-wmtp", "rho1-wmtp"}


def test_recipe_sections_are_frozen():
    with pytest.raises(ValidationError):
        Recipe().train.lr = 1.0  # type: ignore[misc]
