"""The facts the docs state twice stay equal to the code: how many deployments there are and their names, which
flows exist and where, the files of a run directory, and the figures the README quotes (linked to dated entries of
benchmarks/RESULTS.md, never written into the README)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from deployments.catalog import DEPLOYMENTS
from wmtp_core.layout import RunLayout

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "prefect.yaml"]
NUMBER_WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten".split())}
# "four deployments", "the same four deployments", "The four WMTP deployments"; "one" stays out: it is singular.
COUNTED = re.compile(r"\b(two|three|four|five|six|seven|eight|nine|ten|\d+) (?:[A-Za-z]+ )?(deployments|flows)\b")
DEPLOYMENT_NAME = re.compile(r"\bwmtp-[a-z]+/[a-z]+\b")
FIGURE = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|min|minutes|seconds|hours|h|GB|MB|GiB|MiB|GB/s|tokens/s)\b")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def flows_in_code() -> dict[str, str]:
    """Flow name -> its file, from every `@flow(name=...)` under flows/ (read, not imported: no Prefect needed)."""
    found = {}
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "flow":
                name = next(k.value.value for k in node.keywords if k.arg == "name")
                found[name] = str(path.relative_to(ROOT))
    return found


def run_directory_entries() -> set[str]:
    """The top-level names RunLayout spells in a run directory (checkpoints/step_... counts as checkpoints)."""
    root = Path("/run")
    layout = RunLayout(root)
    entries = set()
    for name, member in inspect.getmembers(RunLayout):
        if isinstance(member, property):
            value = getattr(layout, name)
        elif inspect.isfunction(member) and not name.startswith("_"):
            value = member(layout, 1)  # checkpoint(step), data_ledger(rank)
        else:
            continue
        value = value.root if isinstance(value, RunLayout) else value
        if isinstance(value, Path) and value != root:
            entries.add(value.relative_to(root).parts[0])
    return entries


def tree_entries(markdown: str) -> set[str]:
    """The entries listed directly under `runs/<run>/` in a page's directory tree (a line may list several)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "runs/<run>/")
    depth = len(lines[start]) - len(lines[start].lstrip())
    children = []
    for line in lines[start + 1 :]:
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent <= depth or line.strip() == "```":
            break
        children.append((indent, re.split(r"\s{2,}", line.strip())[0]))
    child_indent = min(indent for indent, _ in children)
    names = [name for indent, first in children if indent == child_indent for name in first.split(", ")]
    return {name.split("/")[0] for name in names}


def counted(text: str) -> list[tuple[int, str]]:
    return [(NUMBER_WORDS.get(word) or int(word), noun) for word, noun in COUNTED.findall(text)]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_counts_of_deployments_and_flows_match_the_code(page):
    numbers = {"deployments": len(DEPLOYMENTS), "flows": len(flows_in_code())}
    wrong = [(n, noun) for n, noun in counted(page.read_text()) if n != numbers[noun]]
    assert wrong == [], f"the code has {numbers}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_deployment_named_exists(page):
    named = set(DEPLOYMENT_NAME.findall(page.read_text()))
    assert named - {d.full_name for d in DEPLOYMENTS} == set()


def test_the_prefect_page_describes_every_deployment_and_flow():
    page = (ROOT / "docs" / "prefect.md").read_text()
    assert [d.full_name for d in DEPLOYMENTS if f"`{d.full_name}`" not in page] == []
    rows = dict(re.findall(r"^\| `(wmtp-[a-z]+)` \| `([^`]+)` \|", page, re.M))
    assert rows == flows_in_code(), "the flow table of docs/prefect.md: one row per flow, with its file"


def test_the_readme_names_every_flow_where_it_maps_the_code():
    [line] = [line for line in README.read_text().splitlines() if line.startswith("flows/ ")]
    assert set(re.findall(r"wmtp-[a-z]+", line)) == set(flows_in_code())


def test_the_checkpoints_page_lists_every_file_of_a_run_directory():
    assert tree_entries((ROOT / "docs" / "checkpoints.md").read_text()) == run_directory_entries()


def test_the_run_plan_page_lists_every_file_name_the_layout_owns():
    page = (ROOT / "docs" / "run-plan.md").read_text()
    [listed] = re.findall(r"spells every file of a run directory \(([^)]*)\)", page.replace("\n", " "))
    assert {name.split("/")[0] for name in re.findall(r"`([^`]+)`", listed)} == run_directory_entries()


def test_the_readme_run_layout_shows_real_files_and_the_ones_every_user_meets():
    shown = tree_entries(README.read_text())
    assert shown <= run_directory_entries()
    assert {"recipe.yaml", "tracking.json", "summary.json", "train.lock", "checkpoints", "evaluations"} <= shown


def test_figures_in_the_readme_are_links_to_dated_results():
    readme = README.read_text()
    unlinked = FIGURE.findall(LINK.sub("", readme))
    assert unlinked == [], "quote a measured figure as a link to its dated entry in benchmarks/RESULTS.md"
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for text, target in LINK.findall(readme):
        if target.startswith("benchmarks/RESULTS.md#"):
            section = _section(results, target.partition("#")[2])
            assert re.search(r"^\| 20\d\d-\d\d-\d\d \|", section, re.M), f"{target}: no dated figure there"


def _section(markdown: str, anchor: str) -> str:
    """The text under the `## ` heading whose GitHub anchor is anchor, up to the next such heading."""
    for part in re.split(r"^## ", markdown, flags=re.M)[1:]:
        heading = part.splitlines()[0]
        if re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") == anchor:
            return part
    raise AssertionError(f"benchmarks/RESULTS.md has no section #{anchor}")


def test_the_checks_can_fail():
    assert counted("registers three deployments; the same four deployments; one run flows") == [
        (3, "deployments"),
        (4, "deployments"),
    ]
    tree = "```\n.wmtp/\n  runs/<run>/\n    a.json, b/   x\n    c/\n      d.txt   y\n  mlflow.db\n```"
    assert tree_entries(tree) == {"a.json", "b", "c"}
    assert FIGURE.findall(LINK.sub("", "takes about 80 s; [about 5 GB](x)")) == ["80 s"]
