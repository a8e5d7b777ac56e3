"""Wall time of the `wmtp-train` Prefect flow vs calling the core training loop directly, Prefect server start excluded.

One temporary Prefect server is started before timing; after a warm-up flow run, direct and flow runs of the same
recipe alternate (ABAB) in fresh run directories. The flow does everything a user's run does (environment probe,
run preparation, MLflow run with batched metrics in the embedded SQLite store, checkpoint and summary upload, the
summary artifact); that is the overhead measured. The figure is the median over --repeats of flow / direct.
Target: <= 1.05.

Run: uv run python benchmarks/flow_overhead.py [--repeats 3 --steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="wmtp-flow-bench-"))
# Prefect reads its settings when first imported: set them before anything imports it.
os.environ.update({
    "PREFECT_HOME": str(SCRATCH / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING", "WMTP_HOME": str(SCRATCH / "home"),
})
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.train import wmtp_train  # noqa: E402
from tasks.locations import run_dir  # noqa: E402
from wmtp_core.config import with_run_name  # noqa: E402
from wmtp_core.device import plan_devices, probe_environment  # noqa: E402
from wmtp_core.recipes import load_recipe  # noqa: E402
from wmtp_core.training import train  # noqa: E402


def run_direct(recipe, name: str) -> float:
    plan = plan_devices(recipe.devices, recipe.data, recipe.phases, probe_environment())
    start = time.perf_counter()
    train(recipe, run_dir(name), plan=plan)
    return time.perf_counter() - start


def run_flow(recipe, name: str) -> float:
    start = time.perf_counter()
    state = wmtp_train(recipe=with_run_name(recipe, name), return_state=True)
    elapsed = time.perf_counter() - start
    if not state.is_completed():
        raise RuntimeError(f"flow run {name} ended {state.name}: {state.message}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, e.g. tracking.enabled=false")
    args = parser.parse_args()
    recipe = load_recipe(None, [f"train.max_steps={args.steps}", *args.overrides])
    with prefect_test_harness(server_startup_timeout=180):
        run_flow(recipe, "warmup")
        ratios = []
        for repeat in range(args.repeats):
            order = ("direct", "flow") if repeat % 2 == 0 else ("flow", "direct")
            seconds = {kind: (run_direct if kind == "direct" else run_flow)(recipe, f"{kind}-{repeat}") for kind in order}
            ratios.append(seconds["flow"] / seconds["direct"])
            print(f"repeat {repeat}: flow {seconds['flow']:.1f} s, direct {seconds['direct']:.1f} s, ratio {ratios[-1]:.3f}")
    figures = {"flow_over_direct_median": round(statistics.median(ratios), 4), "ratios": [round(r, 4) for r in ratios]}
    print(json.dumps(figures | {"repeats": args.repeats, "steps": args.steps}))


if __name__ == "__main__":
    main()
