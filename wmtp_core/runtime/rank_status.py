"""Each torchrun rank's own record of itself: who it is (rank, node, host, pid), that it is alive, and how it ended.

A SIGKILLed, stopped or lost rank cannot report itself, but its heartbeat stops: the record's modification time,
touched every BEAT_S by a daemon thread (a stopped process's threads stop with it). The launcher reads the records
(wmtp_core.launch.rank_report) to name the rank that died or stopped first. A record sits beside torchrun's own
error file for the rank, <log dir>/<job>/attempt_<n>/<local rank>/status.json, under the run directory every node
sees, so a node also reads the records of the other nodes' ranks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wmtp_core.runtime.atomic_files import write_atomically

log = logging.getLogger(__name__)
BEAT_S = 1.0
RECORD_NAME = "status.json"


@dataclass(frozen=True)
class RankRecord:
    """One rank of one torchrun job, as it recorded itself (times are wall-clock seconds)."""

    rank: int
    local_rank: int
    node: int
    host: str
    pid: int
    job: str
    started: float
    beat: float
    ended: float | None
    error: str | None
    path: Path

    @property
    def last_alive(self) -> float:
        """When the rank was last known alive: its end, or else its last heartbeat."""
        return self.ended if self.ended is not None else self.beat

    @property
    def where(self) -> str:
        return f"node {self.node}, host {self.host}, pid {self.pid}"


def start_rank_record() -> Path | None:
    """Record this rank (a torchrun worker; None elsewhere) and keep its heartbeat until the process ends."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return None
    path = Path(error_file).with_name(RECORD_NAME)
    write_atomically(path, json.dumps(_identity() | {"started": time.time()}))
    threading.Thread(target=_beat, args=(path,), name="wmtp-heartbeat", daemon=True).start()
    return path


def end_rank_record(path: Path | None, outcome: dict) -> None:
    """Add how the rank ended: the time and, on failure, the error (type: first line)."""
    if path is None:
        return
    error = f"{outcome.get('error_type')}: {outcome.get('message')}" if not outcome.get("ok") else None
    try:
        write_atomically(path, json.dumps(json.loads(path.read_text()) | {"ended": time.time(), "error": error}))
    except OSError as failure:  # the rank's end must still run (its outcome is written; only the record is short)
        log.warning("could not record this rank's end in %s: %s", path, failure)


def job_identity() -> str:
    """What every rank of one torchrun job shares: its rendezvous id and the workers' store. Later jobs of the same
    run may share it too; readers tell them apart by start time."""
    env = os.environ
    return f"{env.get('TORCHELASTIC_RUN_ID')}@{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"


def read_rank_records(log_dir: Path) -> list[RankRecord]:
    """Every rank record under a torchrun log directory (every node's jobs and attempts), oldest start first."""
    records = []
    for path in log_dir.glob(f"*/attempt_*/*/{RECORD_NAME}"):
        try:
            records.append(_parsed(path))
        except (OSError, ValueError, KeyError) as error:  # one bad record must not hide why the job failed
            log.warning("rank record %s left out: %s: %s", path, type(error).__name__, error)
    return sorted(records, key=lambda r: r.started)


def _identity() -> dict:
    env = os.environ
    return {
        "rank": int(env["RANK"]),
        "local_rank": int(env["LOCAL_RANK"]),
        "node": int(env.get("GROUP_RANK", "0")),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job_identity(),
    }


def _beat(path: Path) -> None:
    while True:
        time.sleep(BEAT_S)
        try:
            os.utime(path)
        except FileNotFoundError:  # the run directory was removed under a finished job: nothing left to tell
            return


def _parsed(path: Path) -> RankRecord:
    data = json.loads(path.read_text())
    return RankRecord(
        rank=data["rank"],
        local_rank=data["local_rank"],
        node=data["node"],
        host=data["host"],
        pid=data["pid"],
        job=data["job"],
        started=data["started"],
        beat=path.stat().st_mtime,
        ended=data.get("ended"),
        error=data.get("error"),
        path=path,
    )
