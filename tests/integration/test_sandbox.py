"""The code-execution sandbox with real subprocesses: what passes and fails, and that endless loops, fork storms,
memory hogs and output floods are contained, leave no process behind, and do not stop the evaluation.

The hostile programs bound themselves too (200 forks at most, sleeps), so a broken limit cannot take down the
machine the suite runs on.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from wmtp_core.evaluation.problems import Problem
from wmtp_core.evaluation.sandbox import SandboxLimits, run_sandboxed
from wmtp_core.evaluation.sandbox_child import process_budget
from wmtp_core.evaluation.scoring import score_completions

QUICK = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_mb=256, file_size_mb=1, max_processes=8)
MARGIN_S = 1.5  # start-up and killing on two busy cores


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (this machine's init may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _problem(task_id: str, test: str = "") -> Problem:
    return Problem(task_id, prompt="", test=test, entry_point=None, canonical_solution=None, stop=())


def test_a_program_passes_when_its_asserts_hold_and_fails_with_the_assert_that_did_not():
    assert run_sandboxed("assert sum([1, 2]) == 3\n", limits=QUICK).status == "passed"
    failed = run_sandboxed("def f():\n    return 2\nassert f() == 3, 'f() is not 3'\n", limits=QUICK)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert failed.reason == "AssertionError: f() is not 3" and "Traceback" in failed.stderr_tail


def test_a_program_that_exits_before_its_tests_fails():
    for early_exit in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()"):
        result = run_sandboxed(f"{early_exit}\nassert False\n", limits=QUICK)
        assert (result.status, result.returncode) == ("failed", 0), early_exit
        assert result.reason == "exited before its tests finished"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_an_endless_loop_is_killed_at_its_timeout_with_its_descendants(tmp_path):
    pids = tmp_path / "pids"
    program = f"""
import os, time
def note():
    with open({str(pids)!r}, "a") as out:
        out.write(f"{{os.getpid()}}\\n")
if os.fork() == 0:
    if os.fork() == 0:
        note()
        time.sleep(600)
    note()
    time.sleep(600)
note()
while True:
    pass
"""
    start = time.monotonic()
    result = run_sandboxed(program, limits=SandboxLimits(timeout_s=1.0))
    assert time.monotonic() - start < 1.0 + MARGIN_S
    assert (result.status, result.reason) == ("timed out", "still running at its wall-clock limit of 1 s")
    assert len(_pids(pids)) == 3, "the program, its child and its grandchild should each have noted their pid"
    assert [pid for pid in _pids(pids) if _alive(pid)] == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_a_child_left_running_by_a_passing_program_is_killed(tmp_path):
    pids = tmp_path / "pids"
    program = f"""
import os, time
child = os.fork()
if child == 0:
    time.sleep(600)
    os._exit(0)
with open({str(pids)!r}, "w") as out:
    out.write(str(child))
assert True
"""
    assert run_sandboxed(program, limits=QUICK).status == "passed"
    assert len(_pids(pids)) == 1 and not _alive(_pids(pids)[0])


def test_a_spinning_program_is_stopped_by_its_cpu_limit():
    result = run_sandboxed("while True:\n    pass\n", limits=SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert result.status == "timed out" and "CPU-time limit of 1 s" in result.reason
    assert result.duration_s < 10.0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_a_fork_storm_is_contained_and_the_next_problem_still_scores(tmp_path):
    pids = tmp_path / "pids"
    storm = f"""
import os, time
with open({str(pids)!r}, "a") as out:
    for _ in range(200):
        try:
            child = os.fork()
        except OSError:
            break  # the process limit
        if child == 0:
            time.sleep(60)
            os._exit(0)
        out.write(f"{{child}}\\n")
        out.flush()
while True:
    time.sleep(1)
"""
    problems = [_problem("storm"), _problem("next", "assert double(4) == 8")]
    completions = {"storm": [storm], "next": ["def double(x):\n    return 2 * x"]}
    scores = score_completions(problems, completions, ks=(1,), limits=QUICK, workers=1)
    assert [o.status for o in scores.outcomes] == ["timed out", "passed"]
    assert scores.counts == {"storm": (1, 0), "next": (1, 1)}
    started = _pids(pids)
    assert started and [pid for pid in started if _alive(pid)] == []
    if process_budget(QUICK.max_processes) is not None:  # RLIMIT_NPROC holds: not root, /proc to count with
        assert len(started) < 200


def test_a_memory_hog_is_contained_and_the_next_problem_still_scores():
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n"
    problems = [_problem("hog"), _problem("next", "assert double(4) == 8")]
    completions = {"hog": [hog], "next": ["def double(x):\n    return 2 * x"]}
    start = time.monotonic()
    scores = score_completions(problems, completions, ks=(1,), limits=QUICK, workers=1)
    assert time.monotonic() - start < QUICK.timeout_s  # stopped by the memory limit, not the clock
    assert [(o.status, o.reason) for o in scores.outcomes] == [("failed", "MemoryError"), ("passed", "")]


def test_the_program_sees_none_of_the_evaluators_environment(monkeypatch):
    monkeypatch.setenv("WMTP_TEST_SECRET_TOKEN", "hunter2")
    program = """
import os, sys
assert "WMTP_TEST_SECRET_TOKEN" not in os.environ
assert set(os.environ) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}, sorted(os.environ)
assert sys.flags.isolated == 1
"""
    result = run_sandboxed(program, limits=QUICK)
    assert result.status == "passed", result.stderr_tail


def test_the_program_runs_in_a_fresh_temporary_directory_that_is_removed(tmp_path):
    seen = tmp_path / "seen"
    program = f"""
import os
from pathlib import Path
assert os.listdir(".") == ["program.py"], os.listdir(".")
Path("scratch.txt").write_text("left behind")
Path({str(seen)!r}).write_text(os.getcwd())
"""
    assert run_sandboxed(program, limits=QUICK).status == "passed"
    assert run_sandboxed(program, limits=QUICK).status == "passed"  # the second run starts empty again
    work = Path(seen.read_text())
    assert work.parent == Path(tempfile.gettempdir()) and work.name.startswith("wmtp-sandbox-")
    assert not work.exists() and work != Path.cwd()


def test_output_floods_are_bounded():
    to_stdout = "import sys\nfor _ in range(500):\n    sys.stdout.write('x' * 100_000)\n"  # 50 MB, discarded
    assert run_sandboxed(to_stdout, limits=QUICK).status == "passed"
    to_stderr = "import sys\nwhile True:\n    sys.stderr.write('y' * 100_000)\n"
    result = run_sandboxed(to_stderr, limits=QUICK)
    assert (result.status, result.reason) == ("failed", "wrote past its file-size limit of 1 MiB")
    assert 0 < len(result.stderr_tail) <= 2000


def test_a_large_file_is_refused_by_the_file_size_limit():
    program = "from pathlib import Path\nPath('big').write_bytes(b'z' * (2 * 1024 * 1024))\n"
    result = run_sandboxed(program, limits=QUICK)
    assert result.status == "failed" and "File too large" in result.reason


def test_the_limits_reach_the_program():
    program = f"""
import resource
assert resource.getrlimit(resource.RLIMIT_CPU) == (2, 3)
assert resource.getrlimit(resource.RLIMIT_FSIZE) == (2**20, 2**20)
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
if {os.uname().sysname != "Darwin"}:
    assert resource.getrlimit(resource.RLIMIT_AS) == (256 * 2**20, 256 * 2**20)
"""
    result = run_sandboxed(program, limits=QUICK)
    assert result.status == "passed", result.stderr_tail
