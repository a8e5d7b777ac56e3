"""DESIGN.md section 2 rules: wmtp_core imports no prefect (nor mlflow); flows import no torch; one module talks to MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wmtp_core", "tasks", "flows", "deployments")


def _imported_roots(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_wmtp_core_never_imports_prefect_or_mlflow():
    offenders = [str(p) for p in _sources("wmtp_core") if _imported_roots(p) & {"prefect", "mlflow"}]
    assert offenders == []


def test_only_the_tracking_module_imports_mlflow():
    importers = [p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in _sources(pkg) if "mlflow" in _imported_roots(p)]
    assert importers == ["tasks/tracking.py"]


def test_flow_modules_import_no_torch_at_module_level():
    offenders = [str(p) for p in _sources("flows") if "torch" in _imported_roots(p, module_level_only=True)]
    assert offenders == []


def test_importing_the_flows_and_cli_does_not_load_torch():
    code = "import sys, flows.train, deployments.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
