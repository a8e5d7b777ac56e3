"""A multi-node torchrun job launched by hand: the exact command the other nodes run, and a rendezvous that does not
wait long for a node that is gone.

The flow's node writes its torchrun command, shell-quoted, to runs/<run>/other-nodes.sh; every other node runs that
file (same recipe, plan, run directory and rendezvous id). A relaunch after a node was lost waits REJOIN_WAIT_S for
it at the rendezvous, not the whole silence timeout, and then names the ranks it lost and what to do.
"""

from __future__ import annotations

import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from wmtp_core.launch.rank_report import lost_ranks
from wmtp_core.run.plan import read_plan
from wmtp_core.runtime.atomic_files import write_atomically
from wmtp_core.runtime.rank_status import RankRecord

REJOIN_WAIT_S = 10.0  # a node that comes back (a restarted pod, a relaunch loop) joins well inside this


class RendezvousIncomplete(RuntimeError):
    """Not every node joined the rendezvous in time: no rank started, nothing was trained or saved."""


def node_count(command: list[str]) -> int:
    return int(command[command.index("--nnodes") + 1]) if "--nnodes" in command else 1


@dataclass(frozen=True)
class Rendezvous:
    """This node's side of a multi-node job's rendezvous: how long it waits for the others, the ranks the run's
    previous job lost (then it waits REJOIN_WAIT_S only), and the file the other nodes run."""

    nnodes: int
    wait_s: float
    lost: list[RankRecord]
    script: Path

    @classmethod
    def for_job(cls, command: list[str], log_dir: Path | None, silence_timeout_s: float) -> Rendezvous:
        lost = lost_ranks(log_dir) if log_dir is not None else []
        wait_s = min(REJOIN_WAIT_S, silence_timeout_s) if lost else silence_timeout_s
        return cls(node_count(command), wait_s, lost, write_other_nodes_command(command))

    def failure(self) -> RendezvousIncomplete:
        """The error for a rendezvous that did not complete: which nodes are missing and what to do."""
        if self.lost:
            ranks = ", ".join(f"rank {r.rank} on {r.host} (pid {r.pid}, gone)" for r in self.lost)
            missing = f"node {', '.join(str(n) for n in sorted({r.node for r in self.lost}))} did not come back"
            missing += f" after the previous attempt lost it ({ranks})"
        else:
            missing = f"the other {self.nnodes - 1} node(s) did not join"
        return RendezvousIncomplete(
            f"the rendezvous of {self.nnodes} nodes did not complete in {self.wait_s:.0f} s: {missing}; stopped "
            f"this node's torchrun (nothing was trained). Start `bash {shlex.quote(str(self.script))}` on each "
            "other node, or set devices.nnodes to the nodes you have; then resume the run"
        )


def other_nodes_script(command: list[str], *, run_name: str, nnodes: int) -> str:
    """A bash script that runs command exactly (each argument shell-quoted) on another node."""
    return (
        "#!/usr/bin/env bash\n"
        f"# Run {run_name!r} on {nnodes} nodes: start this on each of the other {nnodes - 1}, with this node's\n"
        f"# run directory shared. Written by {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
        f"exec {shlex.join(command)}\n"
    )


def write_other_nodes_command(command: list[str]) -> Path:
    """Write the other nodes' command into the run directory (the plan in command says which); return its path."""
    plan = read_plan(Path(command[command.index("--plan") + 1]))
    path = plan.layout.other_nodes
    write_atomically(path, other_nodes_script(command, run_name=plan.recipe.run.name, nnodes=node_count(command)))
    path.chmod(0o755)
    return path
