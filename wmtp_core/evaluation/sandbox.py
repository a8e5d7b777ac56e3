"""Run one untrusted Python program in a child process: wall-clock timeout, resource limits, a temporary working
directory, a stripped environment, and the whole process group killed when it ends.

It contains accidents of generated code (endless loops, memory blow-ups, fork storms, output floods), not a
determined attacker: what it cannot prevent, per platform, is in docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Literal

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timed out"]

CHILD = Path(__file__).with_name("sandbox_child.py")
PROGRAM = "program.py"
STDERR_TAIL_BYTES = 2000
KILL_GRACE_S = 2.0
MB = 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use; each process it starts inherits the same limits (they are per process)."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the program's whole process group is killed."""
    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU): SIGXCPU, then SIGKILL a second later."""
    memory_mb: int = 1024
    """Address space per process in MiB (RLIMIT_AS); an allocation beyond it raises MemoryError."""
    file_size_mb: int = 16
    """Largest file a process may write, in MiB (RLIMIT_FSIZE); also bounds the captured stderr."""
    max_processes: int = 16
    """Processes and threads the program may start (RLIMIT_NPROC over the user's count; not enforced for root)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value}")


@dataclass(frozen=True)
class SandboxResult:
    """How a program ended; reason is one line for reports (empty when it passed)."""

    status: Status
    returncode: int
    duration_s: float
    stderr_tail: str
    reason: str


def run_sandboxed(program: str, *, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run program (Python source) to its end or its timeout; passed means exit 0 after its last line ran."""
    work = Path(tempfile.mkdtemp(prefix="wmtp-sandbox-"))
    try:
        (work / PROGRAM).write_text(program, encoding="utf-8")
        return _run_in(work, limits)
    finally:
        shutil.rmtree(work)


def unenforced_limits() -> list[str]:
    """The limits this platform and user do not enforce, as sentences for a warning."""
    notes = []
    if os.getuid() == 0:
        notes.append("max_processes is not enforced for root (the kernel exempts it from RLIMIT_NPROC)")
    elif not os.path.isdir("/proc"):
        notes.append("max_processes is not enforced without /proc (the user's processes cannot be counted)")
    if sys.platform == "darwin":
        notes.append("memory_mb is not enforced on macOS (no RLIMIT_AS)")
    return notes


def _run_in(work: Path, limits: SandboxLimits) -> SandboxResult:
    marker_read, marker_write = os.pipe()
    os.set_blocking(marker_read, False)  # a descendant that escaped the group may still hold the write end
    with tempfile.TemporaryFile() as stderr, open(marker_read, "rb", buffering=0) as marker:
        start = time.monotonic()
        try:
            child = _start(work, limits, stderr=stderr, marker_fd=marker_write)
        finally:
            os.close(marker_write)
        timed_out = _wait(child, limits.timeout_s)
        duration_s = time.monotonic() - start
        ran_to_end = _read_marker(marker)
        tail, stderr_bytes = _tail(stderr)
    ending = _Ending(
        child.returncode, timed_out, ran_to_end, tail, stderr_full=stderr_bytes >= limits.file_size_mb * MB
    )
    status, reason = _verdict(ending, limits)
    return SandboxResult(status, child.returncode, round(duration_s, 3), tail, reason)


def _start(work: Path, limits: SandboxLimits, *, stderr: BinaryIO, marker_fd: int) -> subprocess.Popen:
    child_limits = {
        "cpu_s": limits.cpu_s,
        "memory_bytes": limits.memory_mb * MB,
        "file_size_bytes": limits.file_size_mb * MB,
        "max_processes": limits.max_processes,
    }
    return subprocess.Popen(
        [sys.executable, "-I", str(CHILD), json.dumps(child_limits), str(marker_fd), PROGRAM],
        cwd=work,
        env=_stripped_env(work),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # nothing reads it: a flood costs CPU time, never memory
        stderr=stderr,
        pass_fds=(marker_fd,),
        start_new_session=True,  # its own session and process group, so one killpg reaches every descendant
    )


def _stripped_env(work: Path) -> dict[str, str]:
    """Just enough to run Python: no tokens, credentials or settings of the evaluator reach the program."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}


def _wait(child: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the program, then kill what is left of its group and reap it; True when it ran out of time."""
    try:
        child.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    # Also after a normal exit: descendants it left running die with it. The group's id is not reused while any
    # member lives, so killing the group after its leader was reaped reaches only the program's own processes.
    _kill_group(child.pid)
    child.wait()
    return timed_out


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group, again until none is alive (a fork can race the first signal)."""
    deadline = time.monotonic() + KILL_GRACE_S
    while _signal_group(pgid) and _has_live_member(pgid):
        if time.monotonic() > deadline:
            logger.warning("process group %d still has live processes %.0f s after SIGKILL", pgid, KILL_GRACE_S)
            return
        time.sleep(0.01)


def _signal_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False  # nothing is left in the group
    return True


def _has_live_member(pgid: int) -> bool:
    """Whether a process of the group is still running; zombies do not count (an init that never reaps keeps them)."""
    if not os.path.isdir("/proc"):
        return False  # no way to tell a zombie from a live process: the SIGKILL sent is all we can do
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _live_in_group(entry.name, pgid):
            return True
    return False


def _live_in_group(pid: str, pgid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")"
            state, _, pgrp = stat.read().rsplit(")", 1)[1].split()[:3]
    except OSError:
        return False  # it ended between the listing and the read
    return int(pgrp) == pgid and state not in ("Z", "X")


def _read_marker(marker: BinaryIO) -> bool:
    # A non-blocking read gives None when there is no mark and a write end is still open somewhere.
    return marker.read(2) == b"ok"


def _tail(stderr: BinaryIO) -> tuple[str, int]:
    """The end of what the program wrote to stderr, and how many bytes it wrote."""
    size = stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, size - STDERR_TAIL_BYTES))
    return stderr.read().decode("utf-8", errors="replace"), size


@dataclass(frozen=True)
class _Ending:
    """What was seen of a program's end."""

    returncode: int
    timed_out: bool
    ran_to_end: bool
    stderr_tail: str
    stderr_full: bool


def _verdict(ending: _Ending, limits: SandboxLimits) -> tuple[Status, str]:
    """The status and a one-line reason for reports."""
    returncode = ending.returncode
    if ending.timed_out:
        return "timed out", f"still running at its wall-clock limit of {limits.timeout_s:g} s"
    if returncode == -signal.SIGXCPU:
        return "timed out", f"used its CPU-time limit of {limits.cpu_s} s (SIGXCPU)"
    if returncode == 0 and ending.ran_to_end:
        return "passed", ""
    if returncode == 0:
        return "failed", "exited before its tests finished"
    if returncode == -signal.SIGXFSZ or ending.stderr_full:
        # Python ignores SIGXFSZ (the write fails instead), and a full stderr has no room left for the traceback.
        return "failed", f"wrote past its file-size limit of {limits.file_size_mb} MiB"
    if returncode < 0:
        return "failed", f"killed by {signal.Signals(-returncode).name}"
    return "failed", _last_line(ending.stderr_tail) or f"exit code {returncode}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
