"""The sandbox's limits as values: checked when made, and the process budget counted the way the kernel counts it
(RLIMIT_NPROC: every task of the real user). Running programs is in tests/integration/test_sandbox.py."""

from __future__ import annotations

import os
import threading

import pytest

from wmtp_core.evaluation.sandbox import SandboxLimits, unenforced_limits
from wmtp_core.evaluation.sandbox_child import process_budget, tasks_of_user

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts tasks from /proc")


@pytest.mark.parametrize("field", ["timeout_s", "cpu_s", "memory_mb", "file_size_mb", "max_processes"])
def test_a_limit_must_be_positive(field):
    with pytest.raises(ValueError, match=f"sandbox limit {field} must be positive, got 0"):
        SandboxLimits(**{field: 0})


def _tasks_while_running(num_threads: int) -> int:
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    try:
        return tasks_of_user(os.getuid())
    finally:
        release.set()
        for thread in threads:
            thread.join()


@needs_proc
def test_tasks_of_user_counts_threads_not_just_processes():
    # Other processes of this user come and go meanwhile: take the clearest of three tries, and ask for half.
    added = max(_tasks_while_running(50) - tasks_of_user(os.getuid()) for _ in range(3))
    assert added >= 25


@needs_proc
def test_a_user_without_processes_has_no_tasks():
    assert tasks_of_user(2**31 - 7) == 0


@needs_proc
def test_the_process_budget_is_counted_above_the_users_tasks_or_absent_for_root():
    budget = process_budget(8)
    if os.getuid() == 0:
        assert budget is None
        assert any("max_processes is not enforced for root" in note for note in unenforced_limits())
    else:
        assert budget >= len(os.listdir("/proc/self/task")) + 8
