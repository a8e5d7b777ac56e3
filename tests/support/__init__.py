"""What the tests share besides fixtures (those live in tests/conftest.py): the tiny run, the `wmtp` console script's
environment, full weights of any checkpoint, and locally built Hugging Face models.

Importable as `support` because pyproject.toml puts tests/ on pytest's `pythonpath`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root directory."""
