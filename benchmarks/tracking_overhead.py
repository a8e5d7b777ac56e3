"""Per-step cost of MLflow tracking (Phase 3's buffered sink, a real `mlflow server` on loopback) vs no tracking.

Both contenders run wmtp_core.training.train on the default recipe (metrics every train.log_every steps,
checkpoints only at the end, the same in both), interleaved ABAB; each is timed inside the training loop (seconds
per trained token, from the run's own tokens/s), and the figure is the median over --repeats of
(tracked time per token / untracked time per token) - 1. It also counts the requests the sink sent per report, to show
metrics are batched (one log_batch per report, never one request per metric). Target: overhead <= 2%.

Run: uv run python benchmarks/tracking_overhead.py [--repeats 4 --steps 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's real-server helper

from servers import MlflowServer  # noqa: E402

from mlflow import MlflowClient  # noqa: E402

from tasks.metrics_buffer import BufferedMetrics  # noqa: E402
from wmtp_core.device import plan_devices, probe_environment  # noqa: E402
from wmtp_core.recipes import load_recipe  # noqa: E402
from wmtp_core.training import train  # noqa: E402


class CountingSender:
    """Sends each batch of points with one log_batch request and counts the requests."""

    def __init__(self, client: MlflowClient, run_id: str):
        from tasks.tracking import point_sender

        self.requests, self.points = 0, 0
        self._send = point_sender(run_id)
        assert client  # the sender uses MLFLOW_TRACKING_URI, set to this server in main()

    def __call__(self, points) -> None:
        self._send(points)
        self.requests += 1
        self.points += len(points)


def timed_run(recipe, plan, workdir: Path, sink=None) -> float:
    """Seconds per 1000 trained tokens inside the training loop (set-up, tokenization and the first eval excluded)."""
    result = train(recipe, workdir, plan=plan, on_metrics=sink)
    if sink is not None:
        sink.close(timeout_s=60)
    return 1000.0 / result.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    recipe = load_recipe(None, [f"train.max_steps={args.steps}", f"train.save_every={args.steps}",
                                f"train.eval_every={args.steps}", "train.warmup_steps=5"])
    plan = plan_devices(recipe.devices, recipe.data, recipe.phases, probe_environment())
    with tempfile.TemporaryDirectory() as scratch:
        server = MlflowServer(Path(scratch) / "server")
        server.start()
        try:
            figures = measure(recipe, plan, server, Path(scratch), args.repeats)
        finally:
            server.stop()
    print(json.dumps(figures | {"repeats": args.repeats, "steps": args.steps}))


def measure(recipe, plan, server: MlflowServer, scratch: Path, repeats: int) -> dict:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("benchmark")
    timed_run(recipe, plan, scratch / "warmup")
    ratios, senders = [], []
    for repeat in range(repeats):
        sender = CountingSender(client, client.create_run(experiment).info.run_id)
        tracked_sink = BufferedMetrics(sender, pending_path=scratch / f"pending-{repeat}.jsonl")
        runs = {"tracked": lambda: timed_run(recipe, plan, scratch / f"t{repeat}", tracked_sink),
                "plain": lambda: timed_run(recipe, plan, scratch / f"p{repeat}")}
        order = ("tracked", "plain") if repeat % 2 == 0 else ("plain", "tracked")
        seconds = {name: runs[name]() for name in order}
        ratios.append(seconds["tracked"] / seconds["plain"] - 1.0)
        senders.append(sender)
        print(f"repeat {repeat}: tracked {seconds['tracked']:.4f} s/1k tokens, plain {seconds['plain']:.4f}, "
              f"overhead {ratios[-1]:+.2%}, {sender.requests} requests for {sender.points} points")
    reports = recipe.train.max_steps // recipe.train.log_every + 2  # log steps plus the evals at 0 and the end
    return {"tracking_overhead_median": round(statistics.median(ratios), 4),
            "requests_per_report": round(statistics.median(s.requests for s in senders) / reports, 3)}


if __name__ == "__main__":
    main()
