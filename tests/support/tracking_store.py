"""An empty MLflow tracking store, its tables made, to start a test's $WMTP_HOME with.

A fresh embedded store (SQLite at $WMTP_HOME/mlflow.db) is made by MLflow's schema migrations, about 3 s of CPU per
home; a test whose subject is not that first run starts from a copy of one store made once per session. The copy is
exactly what a second run in a home finds, so what those tests check is unchanged; the first run in a fresh home is
tested without it (test_cli_end_to_end's default `wmtp train`).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


def seed_tracking_store(home: Path) -> None:
    """Give home an empty, migrated mlflow.db, unless it has one."""
    home.mkdir(parents=True, exist_ok=True)
    store = home / "mlflow.db"
    if not store.exists():
        shutil.copyfile(_empty_store(), store)


@functools.cache
def _empty_store() -> Path:
    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="wmtp-test-mlflow-store-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments()  # makes the tables
    return root / "mlflow.db"
