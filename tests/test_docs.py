"""The user documents stay true: README.md and docs/*.md name commands, keys, files and links that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from deployments.cli import app
from wmtp_core.config import Recipe
from wmtp_core.recipes import flatten_recipe

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
README_MAX_LINES = 170
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
MODULE = re.compile(r"\b(?:wmtp_core|tasks|flows|deployments)(?:\.\w+)+")


def code_text(markdown: str) -> str:
    """Everything written as code: fenced blocks and inline code spans."""
    fenced = FENCE.findall(markdown)
    spans = CODE_SPAN.findall(FENCE.sub("", markdown))
    return "\n".join(fenced + spans)


def repository_files(markdown: str) -> set[str]:
    """Words in code that look like a file of this repository: a path under a top-level entry, ending in a suffix."""
    found = set()
    for word in re.split(r"[\s()\[\],;:'\"=]+", code_text(markdown)):
        word = word.strip("`.")
        if "/" in word and not re.search(r"[<>*$]|\.\.", word) and word.split("/")[0] in TOP_LEVEL:
            if "." in word.rsplit("/", 1)[-1]:
                found.add(word)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(markdown: str, page: Path) -> list[str]:
    """Relative links (outside code) whose file, or whose anchor in a markdown file, does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            text = markdown if linked == page else linked.read_text()
            if anchor not in anchors(text):
                broken.append(target)
    return broken


def test_quick_start_shows_the_two_commands():
    readme = README.read_text()
    assert "uv run wmtp train" in readme and "uv run pytest" in readme


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_recipe_key_is_in_the_recipes_page():
    page = (ROOT / "docs" / "recipes.md").read_text()
    missing = [key for key in flatten_recipe(Recipe()) if f"`{key}`" not in page]
    assert missing == [], "run `uv run python configs/generate_examples.py`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page.read_text(), page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_path_in_code_exists(page):
    missing = sorted(p for p in repository_files(page.read_text()) if not (ROOT / p).exists())
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dotted_module_name_exists(page):
    """`wmtp_core.training.worker`, `wmtp_core.runtime.devices.plan_devices`: the module, and the name in it."""
    missing = [name for name in set(MODULE.findall(code_text(page.read_text()))) if not defined(name)]
    assert sorted(missing) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_wmtp_command_shown_exists(page):
    commands = set(typer.main.get_command(app).commands)
    shown = set(re.findall(r"\bwmtp ([a-z][\w-]*\w)", code_text(page.read_text())))
    assert shown - commands == set()


def defined(dotted: str) -> bool:
    """True when the dotted name is a module of this repository, or a name defined at the top of one."""
    parts = dotted.split(".")
    path = ROOT / parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if (path / part).is_dir():
            path = path / part
        elif (path / f"{part}.py").is_file():
            path = path / f"{part}.py"
            rest = parts[i + 1 :]
            return not rest or _defines(path, rest[0])
        else:
            return (path / "__init__.py").is_file() and _defines(path / "__init__.py", part)
    return True


def _defines(module: Path, name: str) -> bool:
    pattern = rf"^(?:def|class)\s+{name}\b|^{name}\s*[:=]|^from .* import .*\b{name}\b"
    return re.search(pattern, module.read_text(), re.M) is not None


@pytest.mark.parametrize(
    "markdown, broken",
    [
        ("see [x](docs/nowhere.md)", ["docs/nowhere.md"]),
        ("see [x](benchmarks/RESULTS.md#no-such-section)", ["benchmarks/RESULTS.md#no-such-section"]),
        ("see [x](benchmarks/RESULTS.md#kill-soak) and [y](https://example.org/a.md)", []),
    ],
)
def test_the_link_check_can_fail(markdown, broken):
    assert broken_links(markdown, README) == broken


def test_the_path_and_module_checks_can_fail():
    words = repository_files("`wmtp_core/checkpoint/nowhere.py` and `configs/tiny.yaml` and `runs/<run>/x.json`")
    assert words == {"wmtp_core/checkpoint/nowhere.py", "configs/tiny.yaml"}
    assert defined("wmtp_core.runtime.devices.plan_devices") and defined("wmtp_core.training.worker")
    assert not defined("wmtp_core.runtime.devices.no_such_name") and not defined("wmtp_core.device")
