"""The wheel carries everything the product reads at run time: it is built, installed in a fresh virtual environment
(the locked versions of its dependencies) and run from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

APPLY_MPS_PROFILE = """
import json, wmtp_core
from wmtp_core.config import Recipe
from wmtp_core.runtime.devices import DevicePlan, apply_device_profile
plan = DevicePlan(device="mps", autocast_dtype=None, use_grad_scaler=False, num_workers=0, reasons=())
recipe, reasons = apply_device_profile(Recipe(), plan)
print(json.dumps({"module": wmtp_core.__file__, "accumulation": recipe.train.grad_accumulation_steps,
                  "reasons": list(reasons)}))
"""


def _run(command: list, *, cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{command[:3]} failed:\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_environment_and_runs_from_outside_the_checkout(tmp_path):
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("needs uv (run the suite with `uv run pytest`)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("UV_")}
    _run([uv, "build", "--wheel", "--out-dir", tmp_path / "dist"], cwd=ROOT, env=env)
    constraints = tmp_path / "constraints.txt"
    _run(
        [
            uv,
            "export",
            "--frozen",
            "--format",
            "requirements-txt",
            "--no-dev",
            "--no-hashes",
            "--no-emit-project",
            "--output-file",
            constraints,
        ],
        cwd=ROOT,
        env=env,
    )
    (wheel,) = (tmp_path / "dist").glob("wmtp-*.whl")
    venv = tmp_path / "venv"
    _run([uv, "venv", "--python", sys.executable, venv], cwd=tmp_path, env=env)
    _run(
        [uv, "pip", "install", "--python", venv / "bin" / "python", "--constraint", constraints, wheel],
        cwd=tmp_path,
        env=env,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env["WMTP_HOME"] = str(outside / ".wmtp")
    assert "train" in _run([venv / "bin" / "wmtp", "--help"], cwd=outside, env=env)
    probe = json.loads(_run([venv / "bin" / "wmtp", "probe"], cwd=outside, env=env))
    assert probe["device_plan"]["device"] in ("cpu", "cuda")
    applied = json.loads(_run([venv / "bin" / "python", "-c", APPLY_MPS_PROFILE], cwd=outside, env=env))
    assert Path(applied["module"]).is_relative_to(venv)  # the installed copy, not the checkout
    assert applied["accumulation"] == 4 and any("devices.precision" in reason for reason in applied["reasons"])
