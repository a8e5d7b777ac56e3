"""The sandbox's child: set the resource limits, run the program as __main__, then mark that it ran to its end.

wmtp_core.evaluation.sandbox starts it as `python -I sandbox_child.py LIMITS_JSON MARKER_FD PROGRAM`. The limits are
set here, not in a preexec_fn: that runs Python between fork and exec, which can deadlock in a parent that starts
sandboxes from a thread pool. Standard library only: this file runs as a script.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys


def main() -> None:
    limits, marker_fd, program = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    set_limits(limits)
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")
    # Reached only when the program ran to its end: an exit(0) or os._exit(0) before its tests leaves no mark.
    os.write(marker_fd, b"ok")


def set_limits(limits: dict) -> None:
    """Lower this process's limits; children inherit them, and the hard limits stop the program raising them back."""
    _cap(resource.RLIMIT_CORE, 0)  # no core files from SIGXCPU or a crash in the working directory
    _cap(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)  # SIGXCPU first, SIGKILL a second later
    _cap(resource.RLIMIT_FSIZE, limits["file_size_bytes"])
    if sys.platform != "darwin":  # macOS does not enforce RLIMIT_AS, and refuses some values of it
        _cap(resource.RLIMIT_AS, limits["memory_bytes"])
    processes = process_budget(limits["max_processes"])
    if processes is not None:
        _cap(resource.RLIMIT_NPROC, processes)


def process_budget(max_processes: int) -> int | None:
    """The RLIMIT_NPROC that lets this program start about max_processes more, or None where it cannot work.

    The kernel counts RLIMIT_NPROC over every task (thread) of the real user, not over this program, so the limit is
    the user's count now plus the budget. Others of the same user starting or ending work meanwhile shift it a little.
    """
    if os.getuid() == 0:
        return None  # the kernel does not enforce RLIMIT_NPROC for root
    if not os.path.isdir("/proc"):
        return None  # nothing to count the user's tasks with (macOS)
    return tasks_of_user(os.getuid()) + max_processes


def tasks_of_user(uid: int) -> int:
    """The number of tasks (threads) whose real user id is uid, from /proc."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _status_fields(entry.name)
            if fields and int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
    return count


def _status_fields(pid: str) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            lines = status.read().splitlines()
    except OSError:
        return None  # the process ended between the listing and the read: it no longer counts
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _cap(which: int, soft: int, hard: int | None = None) -> None:
    """Set a limit, never above the hard limit already in place (raising it would fail without privileges)."""
    hard = soft if hard is None else hard
    current_hard = resource.getrlimit(which)[1]
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


if __name__ == "__main__":
    main()
