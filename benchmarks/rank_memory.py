"""Peak memory of the ranks other than 0 during a sharded save and a sharded resume (FSDP2 on the CPU, gloo).

Target: during a save or a resume of a sharded checkpoint (checkpoint.format=sharded, devices.strategy=fsdp) a rank
other than 0 peaks at no more than 1.1 x (b + S/N): its own shard plus the torch baseline, plus 10%, at N = 2 and 4.
  b     a rank's idle memory: its VmRSS when train() calls build_run_parts (torch and wmtp_core imported, the run
        plan read, the gloo process group up: init_process_group connects every pair; nothing of the model built).
        Each rank's bound uses its own b. Shown beside it, not the target: "b loaded", its VmRSS once this wrapper
        has imported torch._dynamo there, which FSDP2's hooks (torch._dynamo.disable) import during the build anyway;
  S     the full training state: the bytes of every rank's local shards of the parameters and of AdamW's exp_avg
        and exp_avg_sq (fp32; the scalar step counts left out), summed over the ranks, counted once the resume has
        restored them (the checkpoint's sharded/ directory's size on disk is shown beside it).
Peaks are VmHWM (/proc/self/status: anonymous memory and pages of mapped files alike), reset through
/proc/self/clear_refs at the start of each phase, so one phase's peak is not an earlier one's:
  save    each save of a 2-step training run (train.save_every=1, synchronous): reset when the loop calls
          save_run_checkpoint, read when it returns (the rank's shards written by torch.distributed.checkpoint, the
          checkpoint published); the larger of the two saves. It includes what the rank already holds when the save
          starts ("held": weights, AdamW's moments, and what the allocator keeps of the step before);
  resume  a fresh worker resuming that run from step 2, from process start to the return of restore_run_checkpoint
          (the model built on meta and filled from rank 0, then the sharded checkpoint loaded into it), before the
          first step, whose activations and gradients are training's, not the resume's. "built" is the build's
          peak, "restore" the restore's alone.
Every rank also notes each phase's peak and its RSS at the phase's end, split into anonymous and file pages (the
trace printed for rank 1). --live runs the workers with MALLOC_MMAP_THRESHOLD_=65536 (as benchmarks/memory.py
measures): a freed tensor then leaves RSS at once, so the figures are live memory, not what glibc keeps.
Model: benchmarks/checkpoint_save.py's LARGE (106M parameters, S = 1.22 GiB); batches as benchmarks/resume_scale.py's.
Each run is planned as a flow plans it (wmtp_core.run.plan) and launched with its own torchrun command
(wmtp_core.launch.torchrun.worker_command) with this script's --as-worker wrapper in place of
wmtp_core.training.worker; the wrapper ends the resume once restored. Each repeat trains a fresh run per N, then
resumes it; figures are medians over the repeats.

Run: uv run python benchmarks/rank_memory.py [--repeats 3] [--processes 2,4] [--live] [--json]
(about 3 minutes per repeat of both N on 2 busy cores; the 4 ranks of N=4 hold about 10 GiB together at a save)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from resume_scale import RUN, _peak_rss_mib  # benchmarks/resume_scale.py, beside this script

SHARDED = ["checkpoint.format=sharded", "devices.strategy=fsdp", "devices.timeout_s=600", "train.warmup_steps=1"]
TRAINED = ["train.max_steps=2", "train.save_every=1", "train.keep_last=2"]
RESUMED = ["train.max_steps=3", "train.save_every=1", "train.keep_last=2"]
SLACK = 1.10
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", default="2,4", help="the values of N, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wmtp-rank-memory"))
    parser.add_argument("--json", action="store_true", help="print the summary as JSON after the table")
    parser.add_argument("--live", action="store_true", help="workers with MALLOC_MMAP_THRESHOLD_=65536: live memory")
    args = parser.parse_args()
    trials = {int(n): [] for n in args.processes.split(",")}
    for repeat in range(args.repeats):
        for processes in trials:
            trials[processes].append(measure(processes, args.workdir / f"n{processes}-r{repeat}", live=args.live))
            print(f"N={processes} repeat {repeat}:", json.dumps(trials[processes][-1]), flush=True)
    summary = {"benchmark": "rank_memory", "repeats": args.repeats, "slack": SLACK, "live": args.live}
    summary["by_processes"] = {n: summarise(rows) for n, rows in trials.items()}
    print_table(summary["by_processes"])
    if args.json:
        print(json.dumps(summary))


def measure(processes: int, run: Path, *, live: bool = False) -> dict:
    """Train a fresh run 2 steps (a save at each) on N processes, then resume it from step 2: each rank's figures."""
    shutil.rmtree(run, ignore_errors=True)
    trained = launch(run, processes, TRAINED, resume=None, live=live)
    resumed = launch(run, processes, RESUMED, resume="latest", live=live)
    on_disk = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002" / "sharded").iterdir())
    shutil.rmtree(run)  # 2.6 GB of checkpoints per run
    state = sum(rank["shard_bytes"][0] for rank in resumed)
    ranks = [{"rank": r["rank"], **figures(t["marks"], r["marks"])} for t, r in zip(trained, resumed, strict=True)]
    for rank, resuming in zip(ranks, resumed, strict=True):
        rank["shard_mib"] = resuming["shard_bytes"][0] / MIB
    return {"processes": processes, "state_mib": state / MIB, "on_disk_mib": on_disk / MIB, "ranks": ranks}


def figures(training: list, resuming: list) -> dict:
    """A rank's figures from its marks ([label, peak of the span it ends, its RSS, anonymous, file]: as_worker)."""
    labels = [mark[0] for mark in resuming]
    opened, restored = labels.index("until restore"), labels.index("restore")
    saves = [i for i, mark in enumerate(training) if mark[0] == "until save"]
    ends = [next(j for j in range(i, len(training)) if training[j][0] == "save") for i in saves]
    save_peaks = [max(mark[1] for mark in training[i + 1 : end + 1]) for i, end in zip(saves, ends, strict=True)]
    worst = max(range(len(saves)), key=lambda k: save_peaks[k])
    return {
        "b_mib": resuming[0][2],
        "b_training_mib": training[0][2],
        "b_loaded_mib": resuming[labels.index("import torch._dynamo")][2],
        "save_held_mib": training[saves[worst]][2],
        "save_peak_mib": save_peaks[worst],
        "save_peaks_mib": save_peaks,
        "built_rss_mib": resuming[labels.index("build")][2],
        "built_peak_mib": resuming[labels.index("build")][1],
        "restore_peak_mib": max(mark[1] for mark in resuming[opened + 1 : restored + 1]),
        "resume_peak_mib": max(mark[1] for mark in resuming[: restored + 1]),
        "save_phases": training[saves[worst] : ends[worst] + 1],
        "resume_phases": resuming[: restored + 1],
    }


def launch(run: Path, processes: int, overrides: list[str], *, resume: str | None, live: bool) -> list[dict]:
    """Plan the run as a flow does (plan_run, write_plan), launch its torchrun command with this script's wrapper in
    place of the worker module, and return every rank's record."""
    from checkpoint_save import LARGE, MODEL  # imports torch: not at the top, which the workers import too

    from wmtp_core.launch.torchrun import worker_command
    from wmtp_core.recipes import load_recipe
    from wmtp_core.run.plan import plan_run, write_plan

    recipe = load_recipe(None, [*MODEL, *LARGE, *RUN, *SHARDED, f"devices.nproc_per_node={processes}", *overrides])
    planned = plan_run(recipe, resume=resume, directory=run)
    plan_file = write_plan(planned)
    records = run / ("records-resume" if resume else "records-train")
    records.mkdir()
    command = worker_command(planned.plan, plan_file, result_file=records / "result.json")
    module = command.index("wmtp_core.training.worker") - 1  # torchrun's `-m wmtp_core.training.worker`
    command[module : module + 2] = [str(Path(__file__).resolve()), "--as-worker", str(records), "--"]
    with (records / "console.log").open("w") as console:
        cwd = Path(__file__).parents[1]
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {})}
        subprocess.run(command, check=True, stdout=console, stderr=subprocess.STDOUT, cwd=cwd, env=env, timeout=1800)
    return [json.loads((records / f"rank{rank}.json").read_text()) for rank in range(processes)]


def summarise(rows: list[dict]) -> dict:
    """Medians over the repeats, per rank; the bound and the verdict for every rank but 0."""
    processes = rows[0]["processes"]
    state = statistics.median(row["state_mib"] for row in rows)
    ranks = []
    for rank in range(processes):
        medians = {key: statistics.median(row["ranks"][rank][key] for row in rows) for key in FIGURES}
        bound = SLACK * (medians["b_mib"] + state / processes)
        loaded = SLACK * (medians["b_loaded_mib"] + state / processes)  # an explanation, not the target
        worst = max(medians["save_peak_mib"], medians["resume_peak_mib"])
        verdicts = {"passes": worst <= bound, "passes_with_b_loaded": worst <= loaded} if rank else {"passes": None}
        phases = {key: rows[-1]["ranks"][rank][key] for key in ("save_phases", "resume_phases")}  # the last repeat's
        ranks.append({"rank": rank, **medians, "bound_mib": bound, "bound_loaded_mib": loaded, **verdicts, **phases})
    return {
        "state_mib": state,
        "state_per_rank_mib": state / processes,
        "on_disk_mib": statistics.median(row["on_disk_mib"] for row in rows),
        "ranks": ranks,
        "passes": all(rank["passes"] for rank in ranks[1:]),
        "passes_with_b_loaded": all(rank["passes_with_b_loaded"] for rank in ranks[1:]),
    }


FIGURES = [
    "b_mib",
    "b_loaded_mib",
    "b_training_mib",
    "shard_mib",
    "save_held_mib",
    "save_peak_mib",
    "built_rss_mib",
    "built_peak_mib",
    "restore_peak_mib",
    "resume_peak_mib",
]


def print_table(by_processes: dict[int, dict]) -> None:
    head = ["N", "rank", "b", "S/N", "bound 1.1(b+S/N)", "save: held", "save: peak", "resume: built", "restore"]
    head += ["resume: peak", "pass", "b loaded", "1.1(b loaded+S/N)"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for processes, summary in by_processes.items():
        for r in summary["ranks"]:
            cells = [r["b_mib"], summary["state_per_rank_mib"], r["bound_mib"], r["save_held_mib"]]
            cells += [r["save_peak_mib"], r["built_peak_mib"], r["restore_peak_mib"], r["resume_peak_mib"]]
            verdict = "rank 0 (saves)" if r["passes"] is None else ("yes" if r["passes"] else "**no**")
            cells = [processes, r["rank"], *(f"{c:.0f}" for c in cells), verdict, f"{r['b_loaded_mib']:.0f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {r['bound_loaded_mib']:.0f} |")
    for processes, summary in by_processes.items():
        print(f"N={processes}: S = {summary['state_mib']:.0f} MiB (on disk {summary['on_disk_mib']:.0f} MiB)")
        for key in ("save_phases", "resume_phases"):  # rank 1, the last repeat: each span's peak / RSS at its end
            trace = ", ".join("{} {}/{} ({}+{})".format(*mark) for mark in summary["ranks"][1][key])
            print(f"  rank 1 {key.split('_')[0]}, by span, MiB: peak/RSS at its end (anonymous+file): {trace}")


# --as-worker: one rank, its memory marked at the boundaries of the phases of a build, a save and a restore.


def as_worker(records: Path, worker_argv: list[str]) -> None:
    """Each mark ends a span: [label, VmHWM since the previous mark, VmRSS, RssAnon, RssFile now]; VmHWM is reset."""
    from wmtp_core.checkpoint import run_state
    from wmtp_core.training import loop, parts, worker

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "marks": [], "shard_bytes": []}

    def mark(label: str) -> None:
        record["marks"].append([label, _peak_rss_mib(), *_rss_mib("VmRSS", "RssAnon", "RssFile")])
        _reset_peak()
        (records / f"rank{rank}.json").write_text(json.dumps(record))

    def span(module, name: str, label: str, *, opens: bool = False, first=None, then=None) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if opens:
                mark(f"until {label}")
            if first is not None:
                first()
            result = real(*args, **kwargs)
            mark(label)
            if then is not None:
                then(args[0])
            return result

        setattr(module, name, wrapper)

    def count(pieces) -> None:
        record["shard_bytes"].append(_shard_bytes(pieces))
        mark("counted")

    def restored(pieces) -> None:
        count(pieces)
        import torch.distributed as dist

        dist.barrier()  # every rank restored: none is still receiving from one that ends here
        sys.stdout.flush()
        os._exit(0)  # the resume ends here, before the first step: the run stays as saved

    def load_dynamo() -> None:  # FSDP2's hooks import it (torch._dynamo.disable) during the build anyway
        importlib.import_module("torch._dynamo")
        mark("import torch._dynamo")

    span(loop, "build_run_parts", "build", opens=True, first=load_dynamo)
    span(parts, "build_wrapped_model", "model", opens=True)  # in build: the data before it, the optimizer after
    span(loop, "save_run_checkpoint", "save", opens=True, then=count)
    span(loop, "restore_run_checkpoint", "restore", opens=True, then=restored)
    span(run_state, "gather_sharded_state", "get_state_dict")
    span(run_state, "write_sharded", "dcp.save")
    span(run_state, "_publish_sharded", "publish")
    span(run_state, "load_sharded", "dcp.load")
    span(run_state, "restore_sharded_state", "set_state_dict")
    sys.exit(worker.main(worker_argv))


def _shard_bytes(pieces) -> int:
    """This rank's bytes of the parameters and of the optimizer's tensors of more than one element (its shards)."""
    import torch
    from torch.distributed.tensor import DTensor

    states = (value for state in pieces.optimizer.state.values() for value in state.values())
    tensors = [*pieces.model.parameters(), *(v for v in states if torch.is_tensor(v) and v.dim() > 0)]
    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def _rss_mib(*keys: str) -> list[int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return [int(status[key].split()[0]) // 1024 for key in keys]


def _reset_peak() -> None:
    """Set VmHWM to the current VmRSS (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--as-worker":
        as_worker(Path(sys.argv[2]), sys.argv[4:])
    else:
        main()
