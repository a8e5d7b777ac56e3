"""Why a torchrun job failed, from each rank's own evidence: its record and heartbeat (wmtp_core.runtime.rank_status),
its exit status as torchrun reported it, its process state while the job ran (a stopped rank shows state T), and
its own log. The rank named is the first one that stopped living, not the first one torchrun saw fail: a rank that
loses its peer fails a moment after the peer died, with an error of its own ("Connection reset by peer").
"""

from __future__ import annotations

import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from wmtp_core.launch.job_signals import child_pids
from wmtp_core.runtime.rank_status import BEAT_S, RankRecord, read_rank_records

# torchrun's failure report: a block per failed rank, "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: 123)"
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)")
STALE_S = 5 * BEAT_S  # a heartbeat older than this: the rank is stopped, frozen or gone
CLOCK_SLACK_S = 2.0  # ranks of this launch started after it; another node's clock may be this far behind
POLL_S = 1.0  # how often the launcher looks at its ranks' processes
Exits = dict[int, tuple[int, int]]  # rank -> (exit status, pid), as torchrun reported them


class RankWatch:
    """What this node's launcher sees of its torchrun job while it runs: whether ranks were started (the rendezvous
    completed) and which local ranks were seen stopped (process state T)."""

    def __init__(self, torchrun_pid: int, log_dir: Path | None):
        self.torchrun_pid, self.log_dir = torchrun_pid, log_dir
        self.launched_at = time.time()
        self.pids: set[int] = set()  # every local rank seen
        self.stopped: set[int] = set()  # every local rank seen stopped
        self._alive: list[int] = []
        self._stopped_now: list[int] = []
        self._polled = 0.0

    @property
    def started(self) -> bool:
        """Ranks were started: the rendezvous completed."""
        return bool(self.pids)

    @property
    def teardown_blocked(self) -> bool:
        """A rank is stopped and another has ended: torchrun is stopping the job and waits for the stopped one."""
        return bool(self._stopped_now) and len(self._alive) < len(self.pids)

    def poll(self) -> None:
        """Look at the ranks' processes, at most every POLL_S (a look reads /proc)."""
        if time.monotonic() - self._polled < POLL_S:
            return
        self._polled = time.monotonic()
        states = {pid: process_state(pid) for pid in child_pids(self.torchrun_pid)}
        self._alive = [pid for pid, state in states.items() if state not in (None, "Z")]  # a zombie has ended
        self.pids.update(states)
        self._stopped_now = [pid for pid, state in states.items() if state in ("T", "t")]
        self.stopped.update(self._stopped_now)

    def job_records(self) -> list[RankRecord]:
        """The records of this launch's ranks, every node's (another node's ranks log under the same directory)."""
        if self.log_dir is None or not self.log_dir.is_dir():
            return []
        fresh = [r for r in read_rank_records(self.log_dir) if r.started >= self.launched_at - CLOCK_SLACK_S]
        here = socket.gethostname()
        ours = {r.job for r in fresh if r.host == here and r.pid in self.pids}
        return [r for r in fresh if not ours or r.job in ours]


@dataclass
class EndedJob:
    """What the launcher knows of a job that ended: its name, log folder, what it saw, and torchrun's last lines."""

    name: str
    job_dir: Path | None
    watch: RankWatch
    tail: list[str]


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T stopped, Z...), None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def failed_first(job: EndedJob) -> tuple[int | None, RankRecord | None]:
    """The rank that died or stopped first, and its record; a rank that failed before it recorded itself has none
    (then torchrun's "Root Cause" rank is the one named)."""
    records, exits = job.watch.job_records(), exit_statuses(job.tail)
    first = None if _unrecorded_failures(records, exits) else _first_failure(records, exits)
    if first is not None:
        return first.rank, first
    ranks = [int(m.group(1)) for line in job.tail if (m := _RANK.match(line))]
    return (ranks[-1] if ranks else None), None


def failure_message(status: int, job: EndedJob, outcome: dict) -> str:
    """One line naming the rank that died or stopped first and how (outcome: that rank's own, if it wrote one), then
    that rank's own last lines."""
    logs = f" (every rank's output: {job.job_dir})" if job.job_dir else ""
    _, first = failed_first(job)
    if first is None:
        return _torchrun_account(status, job, outcome, logs)
    how = how_it_ended(first, exits=exit_statuses(job.tail), stopped=job.watch.stopped)
    path, last = _rank_log_tail(first.path.parent)
    return (
        f"{job.name} exited with status {status}: rank {first.rank} failed first ({first.where}): {how}"
        f"{_others(job.watch.job_records(), first)}{logs}; its own log {path}, last lines:\n"
        + "\n".join(last or ["(empty: it wrote nothing)"])
    )


def silence_message(said: str, silence_s: float, watch: RankWatch) -> str:
    """Why the job went silent, read while its ranks are still as they were: a stopped rank, a rank (or node) whose
    heartbeat stopped, or every rank alive (one is stuck)."""
    said = f"{said} for {silence_s:.0f} s (devices.timeout_s): stopped it"
    records = watch.job_records()
    if not records:
        return f"{said}; no rank had started (still importing, or waiting at the rendezvous)"
    now = time.time()
    stale = [r for r in records if r.ended is None and now - r.beat > STALE_S]
    culprits = [r for r in records if r.pid in watch.stopped and r.host == socket.gethostname()] or stale
    if not culprits:
        pids = ", ".join(str(r.pid) for r in records)
        return f"{said}; every rank was alive and beating: one is stuck (py-spy dump --pid PID shows where; {pids})"
    named = "; ".join(f"rank {r.rank} ({r.where}) {how_it_ended(r, exits={}, stopped=watch.stopped)}" for r in culprits)
    return f"{said}; {named}; resume continues from the newest checkpoint"


def exit_statuses(console_tail: list[str]) -> Exits:
    """rank -> (exit status, pid) of each rank torchrun reported failed (a negative status: killed by that signal)."""
    found, rank = {}, None
    for line in console_tail:
        if (named := _RANK.match(line)) is not None:
            rank = int(named.group(1))
        elif (exited := _EXIT.match(line)) is not None and rank is not None:
            found[rank] = (int(exited.group(1)), int(exited.group(2)))
    return found


def how_it_ended(record: RankRecord, *, exits: Exits, stopped: set[int]) -> str:
    """One phrase from the rank's own evidence: stopped, killed by a signal, its own error, or silence."""
    beat = time.strftime("%H:%M:%S", time.localtime(record.beat))
    here = record.host == socket.gethostname()
    if record.pid in stopped and here:
        return f"stopped (SIGSTOP or SIGTSTP: process state T; last heartbeat {beat}) and could not go on"
    code, pid = exits.get(record.rank, (None, None))
    code = code if pid == record.pid else None  # another job's rank of that number
    if code is not None and code < 0:
        return f"killed by {_signal_name(-code)}"
    if record.error is not None:
        return f"{record.error}" + (f" (exit status {code})" if code is not None else "")
    if here and process_state(record.pid) in (None, "Z"):
        return f"died without reporting an error (killed? last heartbeat {beat})"
    return (
        f"went silent: no heartbeat since {beat} and no error of its own; its node ({record.host}) is gone or stopped"
    )


def lost_ranks(log_dir: Path) -> list[RankRecord]:
    """The ranks of the run's newest earlier job that ended without a word and are gone: a node that was lost
    (killed, powered off), which a relaunch would wait for at the rendezvous."""
    records = read_rank_records(log_dir) if log_dir.is_dir() else []
    if not records:
        return []
    newest = records[-1]
    # The ranks of one job start together, after its rendezvous; the run's jobs share the job identity.
    job = [r for r in records if r.job == newest.job and r.started >= newest.started - 20]
    return [r for r in job if r.ended is None and _gone(r)]


def _first_failure(records: list[RankRecord], exits: Exits) -> RankRecord | None:
    """The rank that stopped living first among those that did not end well: its end, or its last heartbeat. A rank
    torchrun itself ended with SIGTERM (its teardown, after another rank failed) is never the cause."""
    failed = [r for r in records if (r.ended is None or r.error is not None) and not _torn_down(r, exits)]
    return min(failed, key=lambda r: r.last_alive) if failed else None


def _unrecorded_failures(records: list[RankRecord], exits: Exits) -> list[int]:
    """Ranks torchrun reported failed that never recorded themselves: they failed as they started."""
    recorded = {r.rank for r in records}
    return [rank for rank, (code, _) in exits.items() if rank not in recorded and code != -signal.SIGTERM]


def _torn_down(record: RankRecord, exits: Exits) -> bool:
    return exits.get(record.rank) == (-signal.SIGTERM, record.pid)


def _others(records: list[RankRecord], first: RankRecord) -> str:
    """The ranks that failed after the first (consequences, usually), by error type only."""
    after = [r for r in records if r.path != first.path and (r.ended is None or r.error is not None)]
    said = [f"rank {r.rank} ({r.error.split(':')[0] if r.error else 'no error of its own'})" for r in after]
    return f"; after it: {', '.join(said)}" if said else ""


def _gone(record: RankRecord) -> bool:
    if record.host == socket.gethostname():
        return process_state(record.pid) in (None, "Z")
    return time.time() - record.beat > STALE_S


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _torchrun_account(status: int, job: EndedJob, outcome: dict, logs: str) -> str:
    """The failure as torchrun saw it (its "Root Cause" rank), with that rank's log, for a rank that never recorded
    itself."""
    ranks = [(int(m.group(1)), int(m.group(2))) for line in job.tail if (m := _RANK.match(line))]
    failed_rank, local_rank = ranks[-1] if ranks else (None, None)
    who = f"rank {failed_rank} failed first, " if failed_rank is not None else ""
    error_type, message = outcome.get("error_type"), outcome.get("message")
    cause = f"{error_type}: {message}" if error_type else "died without reporting an error (killed?)"
    attempts = sorted(job.job_dir.glob("attempt_*"), key=lambda p: int(p.name.split("_")[1])) if job.job_dir else []
    own = _rank_log_tail(attempts[-1] / str(local_rank))[1] if attempts and local_rank is not None else []
    last = "\n".join(own or _before_torchrun_summary(job.tail)[-12:])
    return f"{job.name} exited with status {status}: {who}{cause}{logs}; last lines:\n{last}"


def _rank_log_tail(rank_dir: Path, lines: int = 12) -> tuple[Path, list[str]]:
    """A rank's own last lines: stderr (where tracebacks go), else stdout, of its torchrun log folder."""
    for stream in ("stderr.log", "stdout.log"):
        path = rank_dir / stream
        text = path.read_text(errors="replace").splitlines() if path.is_file() else []
        if text := [line for line in text if line.strip()]:
            return path, text[-lines:]
    return rank_dir, []


def _before_torchrun_summary(tail: list[str]) -> list[str]:
    """The job's own last lines: torchrun's closing ChildFailedError report (and its banner) cut off."""
    for index, line in enumerate(tail):
        if "ChildFailedError" in line or "elastic.multiprocessing.errors" in line:
            return tail[:index] or tail
    return tail


def wait_for_rank_0(watch: RankWatch, result_file: Path, *, limit_s: float = 2 * STALE_S) -> None:
    """On several nodes, global rank 0 may run on another node (c10d orders the nodes by host name), and this node's
    torchrun can end before rank 0 has written the job's outcome: wait while rank 0 is alive and has not ended."""
    deadline = time.monotonic() + limit_s
    while not result_file.is_file() and time.monotonic() < deadline:
        rank_0 = [r for r in watch.job_records() if r.rank == 0]
        if not rank_0 or rank_0[-1].ended is not None or time.time() - rank_0[-1].beat > STALE_S:
            return
        time.sleep(0.2)
