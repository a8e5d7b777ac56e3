"""Reading and writing recipes: YAML files, `--set dotted.key=value` overrides, flattening for tracking.

Imports no torch (flows and the CLI use it before anything heavy loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from wmtp_core.config import Recipe, RecipeError

TINY_MODEL = [
    "model.num_layers=2",
    "model.d_model=32",
    "model.num_heads=2",
    "model.horizon=2",
    "model.max_seq_len=64",
    "data.batch_size=4",
]
"""The tiny CPU model of the tests, the smoke recipe (configs/tiny.yaml) and the fix-plan stages: 2 layers, d_model
32, 2 attention heads, horizon 2, 64 tokens, batches of 4. Each adds its own step counts."""


def load_recipe(path: Path | str | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults when path is None), apply `key=value` overrides and validate.

    Every problem is reported at once: one RecipeError whose message lists them all, separated by "; ".
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    problems = []
    for override in overrides:
        try:
            _apply_override(data, override)
        except RecipeError as error:
            problems.append(str(error))
    try:
        recipe = validate_recipe(data)
    except RecipeError as error:
        problems.append(str(error))
    if problems:
        raise RecipeError("; ".join(problems))
    return recipe


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe dict; problems raise one RecipeError that names every offending field, in order."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError("; ".join(_describe(problem) for problem in error.errors())) from None


def _describe(problem: dict) -> str:
    field = ".".join(str(part) for part in problem["loc"]) or "recipe"
    given = f" (got {problem['input']!r})" if "input" in problem and not isinstance(problem["input"], dict) else ""
    message = problem["msg"].removeprefix("Value error, ")
    if message.startswith(f"{field}.") or problem["loc"] == ():
        # A cross-field validator already names its fields ("model.d_model (30) must be ...").
        return message
    return f"{field}: {message}{given}"


def recipe_to_yaml(recipe: Recipe) -> str:
    """The recipe as flat, complete YAML (the form stored beside checkpoints)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def flatten_recipe(recipe: Recipe) -> dict[str, str]:
    """Dotted keys to string values, e.g. {'train.lr': '0.003'}; used for tracking params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe file {path} is not valid YAML: {error}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Set one dotted key in the raw dict; pydantic coerces the string to the field's type."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {override!r} must look like dotted.key=value, e.g. train.lr=1e-3")
    parts = key.strip().split(".")
    _check_key_exists(parts)
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = _parse_value(raw.strip())


def _check_key_exists(parts: list[str]) -> None:
    model: type[BaseModel] | None = Recipe
    for depth, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the recipe"
            raise RecipeError(
                f"unknown recipe key {'.'.join(parts)!r}: {where} has {', '.join(fields) or 'no sections'}"
            )
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _parse_value(raw: str) -> Any:
    # Strings go to pydantic as-is (lax mode turns "1e-3" into a float, "false" into a bool);
    # only null and YAML collections need parsing first.
    if raw.lower() in {"null", "none", "~"}:
        return None
    if raw[:1] in "[{":
        return yaml.safe_load(raw)
    return raw
