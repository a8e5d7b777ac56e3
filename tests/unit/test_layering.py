"""The architecture as rules (DESIGN.md section 2): one import direction, no cycles, the light modules stay light.

Every import counts, the ones inside functions and under TYPE_CHECKING included: a deferred import is still a
dependency, and a cycle that only works because one import is deferred is still a cycle. What a fresh interpreter
loads is checked in tests/integration/test_light_imports.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

from support import ROOT

PACKAGES = ("wmtp_core", "tracking", "tasks", "flows", "deployments")

LAYERS = (
    ("wmtp_core.config", "wmtp_core.recipes", "wmtp_core.progress", "wmtp_core.layout"),
    ("wmtp_core.runtime",),
    ("wmtp_core.data",),
    ("wmtp_core.models",),
    ("wmtp_core.generation",),
    ("wmtp_core.checkpoint",),
    ("wmtp_core.evaluation",),
    ("wmtp_core.algorithms",),
    ("wmtp_core.fixplan",),
    ("wmtp_core.run",),  # the run plan: decided from the recipe, the gates, devices and checkpoints; read by training
    ("wmtp_core.training",),
    ("wmtp_core.launch",),  # starts training processes (torchrun, the fix-plan harness)
    ("tracking",),
    ("tasks",),
    ("flows",),
    ("deployments",),
    ("deployments.cli",),
)
"""Lowest first: a module imports from its own layer and the layers below it, never above."""


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in found if name in modules and not (ROOT / Path(*name.split("."))).is_dir()}


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = modules or product_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    visiting, done = [], set()

    def visit(module: str) -> list[str] | None:
        if module in visiting:
            return visiting[visiting.index(module) :] + [module]
        if module in done:
            return None
        visiting.append(module)
        for imported in sorted(graph[module]):
            if (cycle := visit(imported)) is not None:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module)) is not None), None)


def layer_of(module: str) -> int:
    """The index of the most specific layer prefix that contains module."""
    matches = [
        (len(prefix), index)
        for index, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {imported}"
        for module, imported_set in graph.items()
        for imported in imported_set
        if layer_of(imported) > layer_of(module)
    )


def _roots(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def package_of(module: str) -> str:
    """The part a module belongs to: wmtp_core's subpackage (or top-level module), else its top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "wmtp_core" and len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        edges = packages.setdefault(package_of(module), set())
        edges |= {package_of(name) for name in imported} - {package_of(module)}
    for edges in list(packages.values()):
        for name in edges:
            packages.setdefault(name, set())
    return packages


def test_product_modules_import_no_cycle():
    assert find_cycle(import_graph()) is None


def test_packages_import_no_cycle():
    """A cycle between packages (fixplan -> training -> fixplan) is one even when no two modules form it."""
    assert find_cycle(package_graph(import_graph())) is None


def test_the_package_cycle_check_sees_a_cycle_through_different_modules():
    graph = {
        "wmtp_core.fixplan.gates": set(),
        "wmtp_core.fixplan.harness": {"wmtp_core.training.worker"},
        "wmtp_core.training.worker": {"wmtp_core.fixplan.gates"},
    }
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == ["wmtp_core.fixplan", "wmtp_core.training", "wmtp_core.fixplan"]


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_cycle_and_direction_checks_catch_what_they_are_for():
    graph = {
        "wmtp_core.training.loop": {"wmtp_core.models.build"},
        "wmtp_core.models.build": {"wmtp_core.config"},
        "wmtp_core.config": set(),
    }
    assert find_cycle(graph) is None and upward_imports(graph) == []
    graph["wmtp_core.models.build"].add("wmtp_core.training.loop")  # models learning about training
    assert find_cycle(graph) == ["wmtp_core.models.build", "wmtp_core.training.loop", "wmtp_core.models.build"]
    assert upward_imports(graph) == ["wmtp_core.models.build -> wmtp_core.training.loop"]


def test_nothing_imports_the_cli():
    assert [m for m, imported in import_graph().items() if "deployments.cli" in imported] == []


def test_the_legacy_implementations_are_reached_only_through_the_gates():
    importers = sorted(m for m, imported in import_graph().items() if "wmtp_core.fixplan.legacy" in imported)
    assert importers == ["wmtp_core.fixplan.gates"]


def test_wmtp_core_never_imports_prefect_or_mlflow():
    offenders = [
        str(p) for p in product_modules().values() if "wmtp_core" in p.parts and _roots(p) & {"prefect", "mlflow"}
    ]
    assert offenders == []


def test_only_the_tracking_modules_import_mlflow():
    importers = sorted(m for m, p in product_modules().items() if "mlflow" in _roots(p))
    # runs and metrics; artifact uploads; the final model's flavors
    assert importers == ["tracking.artifacts", "tracking.client", "tracking.mlflow_model"]


def test_flow_modules_import_no_torch_at_module_level():
    offenders = [
        m
        for m, p in product_modules().items()
        if m.startswith("flows") and "torch" in _roots(p, module_level_only=True)
    ]
    assert offenders == []
