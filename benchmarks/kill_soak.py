"""Kill soak: SIGKILL the tiny model's training at random moments, and mid-save, then resume; every trial must
end with a valid checkpoint found on resume and final weights bit-identical to an uninterrupted run.

Run: cd /work/main && .venv/bin/python benchmarks/kill_soak.py [--trials 10 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from kill_trials import run_trial, uninterrupted  # benchmarks/kill_trials.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per moment (training, save)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="wmtp-kill-soak-") as scratch:
        reference = uninterrupted(Path(scratch) / "uninterrupted")
        results = []
        for moment in ("training", "save"):
            for trial in range(args.trials):
                result = run_trial(Path(scratch) / f"{moment}-{trial}", reference, moment=moment, rng=rng)
                results.append(result)
                print(
                    f"{moment:>8} trial {trial}: killed with step {result.killed_at_step} saved, "
                    f"mid-save={result.during_save}, resumes={result.resumes}, identical={result.identical}",
                    flush=True,
                )
    summary = {
        moment: {
            "trials": sum(r.moment == moment for r in results),
            "valid_checkpoint_after_kill": sum(r.moment == moment and r.killed_at_step is not None for r in results),
            "killed_mid_save": sum(r.moment == moment and r.during_save for r in results),
            "final_weights_identical": sum(r.moment == moment and r.identical for r in results),
        }
        for moment in ("training", "save")
    }
    print(json.dumps(summary))
    sys.exit(0 if all(r.identical and r.killed_at_step is not None for r in results) else 1)


if __name__ == "__main__":
    main()
