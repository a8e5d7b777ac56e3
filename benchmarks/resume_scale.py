"""What a resume costs at scale, to the end of its first optimizer step:

  keep     one process resuming a run that keeps 1 checkpoint vs the same run keeping 5 (the same newest one):
           bytes hashed and wall time (launch to the end of the first step); target: keep 5 / keep 1 <= 1.05.
  ranks    the same resume on 1 process vs 2 (devices.strategy=fsdp): bytes hashed on each rank, wall time.
  memory   peak resident memory (VmHWM) of each rank of the 2-process resume: once it has restored the checkpoint
           (the resume itself: build, verify, load) and at the end of its first step (which adds the first
           optimizer step's own temporaries); target: rank 1 below 0.3x rank 0.

Model: 106M parameters (benchmarks/checkpoint_save.py's LARGE), a 1.27 GB checkpoint, trained 5 steps with a save
after each. Each resume is a fresh `wmtp_core.training.worker --resume latest` (under torchrun for 2 processes)
started through this script's --as-worker wrapper, which counts the bytes each rank hashes (every read-back hash goes
through wmtp_core.checkpoint.digests.file_digest; before manifest format 2, manifest._sha256) and ends the rank at
the end of its first step, so nothing is saved and the runs are reused. The contenders alternate; medians.
Peak memory is VmHWM: anonymous memory and the pages of mapped files (a checkpoint read through a map) alike.

--code DIR runs everything (the runs' training included) on another checkout of the library, for before/after
figures: `git archive a7a1346 | tar -x -C /tmp/before` is the code before issue 17.

Run: uv run python benchmarks/resume_scale.py [--repeats 5] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from wmtp_core.recipes import load_recipe, recipe_to_yaml

RUN = ["data.batch_size=2", "model.max_seq_len=64", "train.eval_every=1000", "train.eval_batches=1"]
"""With benchmarks/checkpoint_save.py's MODEL and LARGE (see run_overrides)."""
SAVED = ["train.max_steps=5", "train.save_every=1", "train.keep_last=5", "train.warmup_steps=1"]
RESUMED = ["train.max_steps=6", "train.save_every=1", "train.keep_last=5", "train.warmup_steps=1"]
TWO = ["devices.strategy=fsdp", "devices.nproc_per_node=2", "devices.timeout_s=600"]
CONTENDERS = {"keep1-1proc": ("keep1", 1), "keep5-1proc": ("keep5", 1), "keep1-2proc": ("keep1", 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose wmtp_core runs the workers")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wmtp-resume-scale"))
    args = parser.parse_args()
    workdir = args.workdir / (args.code.name if args.code else "current")
    # The checkout's directory is also the workers' working directory: `python -m` puts it first on sys.path.
    code = (args.code or Path(__file__).parents[1]).resolve()
    env = {**os.environ, "PYTHONPATH": str(code)}
    runs = prepare_runs(workdir, env)
    trials = {name: [] for name in CONTENDERS}
    for repeat in range(args.repeats):
        order = list(CONTENDERS) if repeat % 2 == 0 else list(CONTENDERS)[::-1]
        for name in order:
            run, processes = CONTENDERS[name]
            trials[name].append(resume_once(runs[run], workdir, processes=processes, env=env))
            print(name, json.dumps(trials[name][-1]), flush=True)
    print(json.dumps(summarise(trials, code=str(args.code or "current"))))


def prepare_runs(workdir: Path, env: dict) -> dict[str, Path]:
    """keep5: a run with checkpoints at steps 1-5; keep1: the same newest checkpoint alone (hard links)."""
    keep5, keep1 = workdir / "keep5", workdir / "keep1"
    if not (keep1 / "checkpoints" / "step_00000005").is_dir():
        shutil.rmtree(workdir, ignore_errors=True)
        keep5.mkdir(parents=True)
        recipe = write_recipe(keep5 / "recipe.yaml", [*RUN, *SAVED])
        command = [sys.executable, "-m", "wmtp_core.training.worker", "--recipe", str(recipe), "--run-dir", str(keep5)]
        subprocess.run(command, check=True, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL, timeout=3600)
        shutil.copytree(
            keep5 / "checkpoints" / "step_00000005", keep1 / "checkpoints" / "step_00000005", copy_function=os.link
        )
    return {"keep5": keep5, "keep1": keep1}


def write_recipe(path: Path, overrides: list[str]) -> Path:
    from checkpoint_save import (
        LARGE,
        MODEL,
    )  # benchmarks/checkpoint_save.py, beside this script (torch: not for workers)

    path.write_text(recipe_to_yaml(load_recipe(None, [*MODEL, *LARGE, *overrides])))
    return path


def resume_once(run_dir: Path, workdir: Path, *, processes: int, env: dict) -> dict:
    """One resume to the end of its first step: wall time, and each rank's bytes hashed and peak memory."""
    recipe = write_recipe(workdir / f"resume-{processes}.yaml", [*RUN, *RESUMED, *(TWO if processes > 1 else [])])
    records = workdir / "records"
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir()
    worker = ["--recipe", str(recipe), "--run-dir", str(run_dir), "--resume", "latest", "--result", str(records / "r")]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        launcher += ["--log-dir", str(records / "torchrun")]  # not a torchelastic_* directory left in /tmp
    started = time.time()
    command = [*launcher, str(Path(__file__).resolve()), "--as-worker", str(records), "--", *worker]
    subprocess.run(command, check=True, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL, timeout=1800)
    ranks = [json.loads(p.read_text()) for p in sorted(records.glob("rank*.json"))]
    assert len(ranks) == processes, f"{len(ranks)} of {processes} ranks reached their first step"
    return {
        "wall_s": round(max(r["first_step_done_at"] for r in ranks) - started, 2),
        "hashed_bytes": [r["hashed_bytes"] for r in ranks],
        "peak_rss_resume_mib": [r["peak_rss_resume_mib"] for r in ranks],
        "peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
    }


def summarise(trials: dict[str, list[dict]], *, code: str) -> dict:
    keep1, keep5, two = trials["keep1-1proc"], trials["keep5-1proc"], trials["keep1-2proc"]

    def median(rows: list[dict], key: str, index: int = 0) -> float:
        return statistics.median(row[key][index] if isinstance(row[key], list) else row[key] for row in rows)

    return {
        "benchmark": "resume_scale",
        "code": code,
        "repeats": len(keep1),
        "keep5_over_keep1_wall": round(statistics.median(b["wall_s"] / a["wall_s"] for a, b in zip(keep1, keep5)), 3),
        "wall_s": {name: median(rows, "wall_s") for name, rows in trials.items()},
        "hashed_bytes": {name: rows[0]["hashed_bytes"] for name, rows in trials.items()},
        "two_process_peak_rss_resume_mib": [median(two, "peak_rss_resume_mib", rank) for rank in (0, 1)],
        "rank1_over_rank0_peak_resume": _rank_ratio(two, "peak_rss_resume_mib"),
        "two_process_peak_rss_first_step_mib": [median(two, "peak_rss_mib", rank) for rank in (0, 1)],
        "rank1_over_rank0_peak_first_step": _rank_ratio(two, "peak_rss_mib"),
        "one_process_peak_rss_resume_mib": median(keep1, "peak_rss_resume_mib"),
    }


def _rank_ratio(rows: list[dict], key: str) -> float:
    return round(statistics.median(row[key][1] / row[key][0] for row in rows), 3)


# --as-worker: one rank of a resume, counted and stopped at the end of its first step.


def as_worker(records: Path, worker_argv: list[str]) -> None:
    hashed = [0]
    count_hashing(hashed)
    stop_after_first_step(records, hashed)
    from wmtp_core.training import worker

    sys.exit(worker.main(worker_argv))


def count_hashing(hashed: list[int]) -> None:
    """Count the bytes of every file hashed by reading it back, in this code or in the code before format 2."""
    from wmtp_core.checkpoint import manifest

    try:
        from wmtp_core.checkpoint import digests
    except ImportError:  # before manifest format 2: sha256 through manifest._sha256
        digests = None
    module, name = (digests, "file_digest") if digests else (manifest, "_sha256")
    real = getattr(module, name)

    def counting(path, *args, **kwargs):
        hashed[0] += Path(path).stat().st_size
        return real(path, *args, **kwargs)

    setattr(module, name, counting)


def stop_after_first_step(records: Path, hashed: list[int]) -> None:
    """Note the peak memory once the checkpoint is restored; write this rank's record at the end of its first
    optimizer step, then end the process there."""
    from wmtp_core.training import loop

    real_restore, real_step, resumed = loop.restore_run_checkpoint, loop.train_step, {}

    def restore(*args, **kwargs):
        progress = real_restore(*args, **kwargs)
        resumed["peak_rss_resume_mib"] = _peak_rss_mib()
        return progress

    def first_step(*args, **kwargs):
        real_step(*args, **kwargs)
        rank = int(os.environ.get("RANK", "0"))
        record = {"first_step_done_at": time.time(), "hashed_bytes": hashed[0], "peak_rss_mib": _peak_rss_mib()}
        (records / f"rank{rank}.json").write_text(json.dumps({**record, **resumed}))
        sys.stdout.flush()
        os._exit(0)  # no save at the end: the run stays as it is for the next trial

    loop.restore_run_checkpoint, loop.train_step = restore, first_step


def _peak_rss_mib() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) // 1024


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--as-worker":
        as_worker(Path(sys.argv[2]), sys.argv[4:])
    else:
        main()
