"""Per-step cost of MLflow tracking (Phase 3's buffered sink, a real `mlflow server` on loopback) vs no tracking.

Both contenders run wmtp_core.training.loop.train on the default recipe (metrics every train.log_every steps,
checkpoints only at the end, the same in both), interleaved ABAB; each is timed inside the training loop (seconds
per trained token, from the run's own tokens/s), and the figure is the median over --repeats of
(tracked time per token / untracked time per token) - 1. It also counts the requests the sink sent per report, to show
metrics are batched (one log_batch per report, never one request per metric). Target: overhead <= 2%.

Wall-clock ratios on a 2-core machine with the server on the same cores carry about +-10% noise, so the script also
accounts for the CPU tracking costs directly, which noise does not blur: seconds spent inside the metrics callback
on the training thread, CPU seconds of the background sender thread, and CPU seconds of the mlflow server's process
group during the tracked run (an upper bound: on a real deployment the server runs elsewhere), as a fraction of the
tracked run's wall time.

Run: uv run python benchmarks/tracking_overhead.py [--repeats 4 --steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from servers import MlflowServer  # benchmarks/servers.py, beside this script (the tests use it too)

from tracking.metrics_buffer import BufferedMetrics
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_run, write_plan
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import train


class CountingSender:
    """Sends each batch of points with one log_batch request and counts the requests."""

    def __init__(self, client: MlflowClient, run_id: str):
        from tracking.client import point_sender

        self.requests, self.points, self.cpu_s = 0, 0, 0.0
        self._send = point_sender(run_id)
        assert client  # the sender uses MLFLOW_TRACKING_URI, set to this server in main()

    def __call__(self, points) -> None:
        started = time.thread_time()  # CPU of the sender thread only
        try:
            self._send(points)
        finally:
            self.cpu_s += time.thread_time() - started
        self.requests += 1
        self.points += len(points)


class TimedCallback:
    """The metrics callback as the training loop calls it, with the time spent inside it summed."""

    def __init__(self, sink):
        self.sink, self.seconds = sink, 0.0

    def __call__(self, step, metrics) -> None:
        started = time.perf_counter()
        self.sink(step, metrics)
        self.seconds += time.perf_counter() - started

    def close(self, **kwargs) -> int:
        return self.sink.close(**kwargs)


def process_group_cpu_s(pgid: int) -> float:
    """utime + stime (seconds) of every live process in the group, from /proc."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(12) stime(13)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed_run(recipe, probe, workdir: Path, sink=None) -> float:
    """Seconds per 1000 trained tokens inside the training loop (set-up, tokenization and the first eval excluded)."""
    planned = plan_run(recipe, directory=workdir, probe=probe)
    write_plan(planned)
    result = train(planned.plan, on_metrics=sink)
    if sink is not None:
        sink.close(timeout_s=60)
    return 1000.0 / result.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    recipe = load_recipe(
        None,
        [
            f"train.max_steps={args.steps}",
            f"train.save_every={args.steps}",
            f"train.eval_every={args.steps}",
            "train.warmup_steps=5",
        ],
    )
    probe = probe_environment()
    with tempfile.TemporaryDirectory() as scratch:
        server = MlflowServer(Path(scratch) / "server")
        server.start()
        try:
            figures = measure(recipe, probe, server, Path(scratch), args.repeats)
        finally:
            server.stop()
    print(json.dumps(figures | {"repeats": args.repeats, "steps": args.steps}))


def measure(recipe, probe, server: MlflowServer, scratch: Path, repeats: int) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("benchmark")
    timed_run(recipe, probe, scratch / "warmup")
    ratios, senders, cpu_shares = [], [], []
    for repeat in range(repeats):
        sender = CountingSender(client, client.create_run(experiment).info.run_id)
        callback = TimedCallback(BufferedMetrics(sender, pending_path=scratch / f"pending-{repeat}.jsonl"))
        server_cpu, wall = {}, {}

        def tracked():
            before, started = process_group_cpu_s(server.process.pid), time.perf_counter()
            seconds = timed_run(recipe, probe, scratch / f"t{repeat}", callback)
            wall["tracked"] = time.perf_counter() - started
            server_cpu["tracked"] = process_group_cpu_s(server.process.pid) - before
            return seconds

        runs = {"tracked": tracked, "plain": lambda: timed_run(recipe, probe, scratch / f"p{repeat}")}
        order = ("tracked", "plain") if repeat % 2 == 0 else ("plain", "tracked")
        seconds = {name: runs[name]() for name in order}
        ratios.append(seconds["tracked"] / seconds["plain"] - 1.0)
        senders.append(sender)
        cpu = callback.seconds + sender.cpu_s + server_cpu["tracked"]
        cpu_shares.append(cpu / wall["tracked"])
        print(
            f"repeat {repeat}: wall overhead {ratios[-1]:+.2%}; tracking CPU {cpu:.3f} s of a "
            f"{wall['tracked']:.1f} s run "
            f"= {cpu_shares[-1]:.2%} (callback {callback.seconds:.4f} s, sender {sender.cpu_s:.3f} s, "
            f"server {server_cpu['tracked']:.2f} s); {sender.requests} requests for {sender.points} points",
            flush=True,
        )
    reports = recipe.train.max_steps // recipe.train.log_every + 2  # log steps plus the evals at 0 and the end
    return {
        "wall_overhead_median": round(statistics.median(ratios), 4),
        "tracking_cpu_share_median": round(statistics.median(cpu_shares), 4),
        "requests_per_report": round(statistics.median(s.requests for s in senders) / reports, 3),
    }


if __name__ == "__main__":
    main()
