"""The README stays true: the quick-start commands and every recipe key are documented."""

from __future__ import annotations

from pathlib import Path

from wmtp_core.config import Recipe
from wmtp_core.recipes import flatten_recipe

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_shows_the_two_commands():
    assert "uv run wmtp train" in README and "uv run pytest" in README


def test_every_recipe_key_is_in_the_readme():
    missing = [key for key in flatten_recipe(Recipe()) if f"`{key}`" not in README]
    assert missing == []
