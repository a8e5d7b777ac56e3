"""Shared fixtures: a tiny recipe, an isolated $WMTP_HOME, and one Prefect test server per session.

Prefect settings are read when prefect is first imported, so its environment is set here, before any test
module imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="wmtp-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "wmtp_core,tasks"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from servers import MlflowServer  # noqa: E402

from wmtp_core.config import Recipe  # noqa: E402  (after the Prefect environment above)
from wmtp_core.recipes import TINY_MODEL, load_recipe  # noqa: E402

TINY_RUN = [
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.save_every=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "seed=7",
]
"""The tiny run every test shares: 4 steps, saves and evals every 2."""
TINY_OVERRIDES = [*TINY_MODEL, *TINY_RUN]


def full_model_state(checkpoint: Path) -> dict:
    """A checkpoint's full model weights: its model.safetensors or, for a sharded checkpoint, that of a converted
    copy (torch.distributed.checkpoint's own consolidation). The checkpoint itself is left as it is."""
    from safetensors.torch import load_file

    from wmtp_core.checkpoint.storage import MODEL_FILE, convert_to_full

    if (checkpoint / MODEL_FILE).is_file():
        return load_file(checkpoint / MODEL_FILE)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "checkpoints" / checkpoint.name
        shutil.copytree(checkpoint, copy)
        return load_file(convert_to_full(copy, Path(scratch)) / MODEL_FILE)


@pytest.fixture
def tiny_recipe() -> Recipe:
    """The tiny CPU model (2 layers, d_model 32, horizon 2, 64 tokens) on the built-in data, 4 steps."""
    return load_recipe(None, TINY_OVERRIDES)


@pytest.fixture
def wmtp_home(tmp_path, monkeypatch):
    """An empty $WMTP_HOME for the test (checkpoints, the embedded MLflow store, summaries)."""
    home = tmp_path / "wmtp-home"
    home.mkdir()
    monkeypatch.setenv("WMTP_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """One temporary Prefect server for the whole session (it takes ~20 s to start on two cores)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture
def run_wmtp():
    """Run the real `wmtp` console script with --json and return its summary (asserting exit 0).

    With api_url the run uses that Prefect server instead of starting a temporary one (~20 s saved per call).
    """

    def run(
        args: list[str], *, home: Path, api_url: str | None = None, mlflow_uri: str | None = None, timeout: int = 600
    ) -> dict:
        env = wmtp_environment(home, api_url=api_url, mlflow_uri=mlflow_uri)
        out = subprocess.run([WMTP, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    return run


WMTP = str(Path(sys.executable).parent / "wmtp")


def wmtp_environment(home: Path, *, api_url: str | None = None, mlflow_uri: str | None = None) -> dict[str, str]:
    """The environment of a `wmtp` subprocess: this process's, minus Prefect/MLflow settings, plus the given ones.

    Its PREFECT_HOME is its own (beside home): the user's profiles in ~/.prefect must not reach a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["WMTP_HOME"] = str(home)
    env["PREFECT_HOME"] = f"{home}-prefect-home"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


@pytest.fixture(scope="module")
def _module_mlflow_server(tmp_path_factory):
    # One start per module: an `mlflow server` takes about 16 s to start on two cores.
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_module_mlflow_server):
    """A running MLflow server, shared by the module's tests (each logs to its own runs) and always stopped after
    them; a test may stop it (an outage): the next test gets it started again."""
    if _module_mlflow_server.process.poll() is not None:
        _module_mlflow_server.start()
    return _module_mlflow_server
