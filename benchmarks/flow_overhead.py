"""Wall time of the `wmtp-train` Prefect flow vs calling the core training loop directly; server start excluded.

Contenders, the same recipe (default model, train.max_steps=--steps, tracking enabled as in a real run):
  direct  wmtp_core.training.loop.train(recipe, run_dir, plan=...) with the plan from plan_devices(probe_environment());
  flow    flows.train.wmtp_train(recipe=...) in-process: environment probe, run preparation, the MLflow run (params,
          metrics through the tracking sink into the embedded SQLite store under $WMTP_HOME), training, checkpoint
          and summary upload, the summary artifact. All of that is the overhead measured.
The environment is set before prefect is imported: a temporary PREFECT_HOME and $WMTP_HOME, analytics off, and the
defaults the `wmtp` CLI sets (flows.temporary_server.default_prefect_environment). ONE temporary Prefect server is
started (prefect_test_harness) before any timing; one short warm-up flow run follows (first MLflow store creation,
imports), then direct and flow runs alternate (order reversed every other repeat), each in a fresh run name/directory.
Figures: median over --repeats of flow/direct wall time (target <= 1.05), the median extra seconds, and the median
direct/flow ratio of the loop's own tokens/s (how much of the overhead is inside the training loop).

Run: uv run python benchmarks/flow_overhead.py [--repeats 3 --steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def set_environment(scratch: Path) -> None:
    """Prefect reads its settings when first imported, so this must run before anything imports prefect."""
    os.environ["PREFECT_HOME"] = str(scratch / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["WMTP_HOME"] = str(scratch / "home")
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(name, None)  # the temporary server and the embedded MLflow store, as in a default local run
    from flows.temporary_server import default_prefect_environment

    default_prefect_environment()  # start-up timeout, core and task logs in the run log, no API logs outside flows
    assert "prefect" not in sys.modules, "prefect was imported before its environment was set"


def run_direct(recipe, name: str) -> tuple[float, float]:
    """(wall seconds, loop tokens/s) of the core loop called directly."""
    from wmtp_core.config import with_run_name
    from wmtp_core.run.plan import plan_run, write_plan
    from wmtp_core.training.loop import train

    start = time.perf_counter()
    planned = plan_run(with_run_name(recipe, name))
    write_plan(planned)
    result = train(planned.plan)
    return time.perf_counter() - start, result.tokens_per_s


def run_flow(recipe, name: str) -> tuple[float, float]:
    """(wall seconds, loop tokens/s) of the wmtp-train flow; raises unless the run completed."""
    from flows.train import wmtp_train
    from wmtp_core.config import with_run_name

    start = time.perf_counter()
    state = wmtp_train(recipe=with_run_name(recipe, name), return_state=True)
    elapsed = time.perf_counter() - start
    summary = state.result(raise_on_failure=False) if state.is_completed() else None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        raise RuntimeError(f"flow run {name} ended {state.name}: {state.message}")
    return elapsed, summary["tokens_per_s"]


def measure(recipe, warmup_recipe, *, repeats: int) -> list[dict]:
    from prefect.testing.utilities import prefect_test_harness

    rows = []
    with prefect_test_harness(server_startup_timeout=180):  # started once; not timed
        run_flow(warmup_recipe, "warmup-flow")
        for repeat in range(repeats):
            order = ("direct", "flow") if repeat % 2 == 0 else ("flow", "direct")
            row = {"repeat": repeat}
            for kind in order:
                seconds, tokens_per_s = (run_direct if kind == "direct" else run_flow)(recipe, f"{kind}-{repeat}")
                row[kind], row[f"{kind}_tokens_per_s"] = seconds, tokens_per_s
            rows.append(row)
            print(f"repeat {repeat}: flow/direct {row['flow'] / row['direct']:.3f}", flush=True)
    return rows


def summarise(rows: list[dict], args) -> dict:
    ratios = [r["flow"] / r["direct"] for r in rows]
    extra = [r["flow"] - r["direct"] for r in rows]
    loop = [r["direct_tokens_per_s"] / r["flow_tokens_per_s"] for r in rows]
    print(f"{'repeat':>6} {'direct s':>9} {'flow s':>8} {'flow/direct':>12} {'loop tok/s direct/flow':>23}")
    for r, ratio, loop_ratio in zip(rows, ratios, loop):
        print(f"{r['repeat']:>6} {r['direct']:>9.1f} {r['flow']:>8.1f} {ratio:>12.3f} {loop_ratio:>23.3f}")
    median = statistics.median(ratios)
    print(
        f"median flow/direct {median:.3f} over {len(rows)} repeats (target <= 1.05): "
        f"{'OK' if median <= 1.05 else 'ABOVE TARGET'}; median extra {statistics.median(extra):.1f} s per run"
    )
    return {
        "benchmark": "flow_overhead",
        "repeats": args.repeats,
        "steps": args.steps,
        "overrides": args.overrides,
        "ratio_flow_over_direct": round(median, 4),
        "ratios": [round(x, 4) for x in ratios],
        "median_extra_s": round(statistics.median(extra), 2),
        "median_direct_s": round(statistics.median(r["direct"] for r in rows), 2),
        "median_flow_s": round(statistics.median(r["flow"] for r in rows), 2),
        "loop_tokens_per_s_direct_over_flow": round(statistics.median(loop), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="direct/flow pairs, alternating")
    parser.add_argument("--steps", type=int, default=150, help="train.max_steps of every timed run")
    parser.add_argument("--warmup-steps", type=int, default=20, help="train.max_steps of the untimed warm-up flow run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override key=value")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PREFECT_HOME/WMTP_HOME")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="wmtp-flow-bench-"))
    set_environment(scratch)
    from wmtp_core.recipes import load_recipe

    recipe = load_recipe(None, [f"train.max_steps={args.steps}", *args.overrides])
    warmup = load_recipe(None, [f"train.max_steps={args.warmup_steps}", *args.overrides])
    try:
        figures = summarise(measure(recipe, warmup, repeats=args.repeats), args)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
