"""The tree stays formatted and lint-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_tree_is_formatted():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, f"run `uv run ruff format`:\n{out.stdout[-2000:]}"


def test_ruff_check_is_clean():
    out = _ruff("check", ".")
    assert out.returncode == 0, f"run `uv run ruff check --fix`:\n{out.stdout[-2000:]}"
