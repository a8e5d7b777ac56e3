"""Fixtures: a tiny recipe, an isolated $WMTP_HOME, one Prefect test server per session, one MLflow server per
module, the `wmtp` console script, and tiny Hugging Face models built once per session.

Prefect settings are read when prefect is first imported, so its environment is set here, before any test module
imports it. Plain helpers (the tiny run, checkpoint reading, the console script's environment) are in tests/support/.
"""

from __future__ import annotations

import os
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

from support.cli import run_wmtp_json  # noqa: E402
from support.recipes import TINY_OVERRIDES  # noqa: E402

from benchmarks.servers import MlflowServer  # noqa: E402
from wmtp_core.config import Recipe  # noqa: E402  (after the Prefect environment above)
from wmtp_core.recipes import load_recipe  # noqa: E402


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

    Pass api_url=prefect_api_url: without it the command starts a temporary Prefect server of its own (~20 s).
    """

    def run(args: list[str], **options) -> dict:
        """options: those of support.cli.run_wmtp_json (home, api_url, mlflow_uri, timeout, fresh)."""
        out, summary = run_wmtp_json(args, **options)
        assert out.returncode == 0, out.stderr[-3000:]
        return summary

    return run


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


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Hugging Face models saved with their tokenizers (read only: tests train from them, never into them):
    llama, llama-seed-1 (the same shapes and tokenizer, other weights) and gpt2."""
    from support.hf_models import build_tokenizer, save_gpt2, save_llama

    root = tmp_path_factory.mktemp("hf-models")
    llama_tokenizer = build_tokenizer()
    return {
        "llama": save_llama(root / "llama", llama_tokenizer),
        "llama-seed-1": save_llama(root / "llama-seed-1", llama_tokenizer, seed=1),
        "gpt2": save_gpt2(root / "gpt2", build_tokenizer(with_pad=False)),
    }


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where CUDA is not available (torch is imported only if any was collected)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_tests:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
