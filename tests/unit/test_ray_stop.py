"""A stop reaches every rank of a Ray job: the driver's SIGTERM or Ctrl-C becomes the job directory's stop file, and
each worker passes the signal it names on to its training process (which saves and exits 143, as under torchrun)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from wmtp_core.launch.ray_job import stop_signals_to
from wmtp_core.launch.ray_ranks import run_until_exit

# A training process in miniature: says it is ready, then exits 143 on SIGTERM and 130 on SIGINT.
CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
print("ready", flush=True)
time.sleep(60)
sys.exit(1)
"""


def test_sigterm_and_ctrl_c_to_the_driver_write_the_stop_file_naming_the_signal(tmp_path):
    stop_file = tmp_path / "job" / "stop_requested"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_signals_to(stop_file):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_file.read_text() == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        assert stop_file.read_text() == "SIGINT"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_rank_passes_the_stop_files_signal_to_its_training_process_and_keeps_its_log(tmp_path):
    stop_file, log_file = tmp_path / "stop_requested", tmp_path / "rank_0.log"
    ready = threading.Timer(3.0, lambda: stop_file.write_text("SIGTERM"))
    ready.start()
    status = run_until_exit(
        [sys.executable, "-c", CHILD], dict(os.environ), log_file, stop_file=stop_file, header="rank 0 of 1"
    )
    ready.cancel()
    assert status == 143
    assert log_file.read_text().splitlines() == ["# rank 0 of 1", "ready"]
