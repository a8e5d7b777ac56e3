"""Benchmarks scored through the sandbox with real subprocesses: known-correct solutions pass, wrong ones fail, and
pass@k is reported only where every problem has the samples for it."""

from __future__ import annotations

import json

import pytest

from wmtp_core.data.records import builtin_dataset_path, format_prompt, load_records, split_records
from wmtp_core.evaluation.problems import Problem, load_problems
from wmtp_core.evaluation.scoring import score_completions

SPLIT = {"eval_fraction": 0.1, "seed": 1337}  # the default recipe's data.eval_fraction and seed


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass():
    problems = load_problems("humaneval", **SPLIT)
    progress = []
    scores = score_completions(
        problems,
        {p.task_id: [p.canonical_solution] for p in problems},
        workers=2,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert [(o.task_id, o.reason) for o in scores.outcomes if o.status != "passed"] == []
    assert scores.pass_at_k == {1: 1.0} and len(scores.counts) == 164 and scores.unscored == ()
    assert progress[-1] == (164, 164) and len(progress) == 164


def test_a_body_of_pass_scores_zero_on_humaneval():
    problems = load_problems("humaneval", **SPLIT)[::20]  # 9 problems across the set
    scores = score_completions(problems, {p.task_id: ["    pass\n"] for p in problems}, workers=2)
    assert scores.pass_at_k == {1: 0.0}
    assert {o.status for o in scores.outcomes} == {"failed"}


def test_builtin_held_out_solutions_pass_and_its_buggy_ones_fail():
    _, held_out = split_records(load_records(builtin_dataset_path()), **SPLIT)
    problems = load_problems("builtin", **SPLIT)
    by_prompt = {p.prompt: p.task_id for p in problems}
    completions, expected = {}, {}
    for record in (r for r in held_out if format_prompt(r) in by_prompt):  # prompts training saw are left out
        task_id = by_prompt[format_prompt(record)]
        completions.setdefault(task_id, []).append(record.code)
        expected[(task_id, len(completions[task_id]) - 1)] = "passed" if record.is_correct else "failed"
    scores = score_completions(problems, completions, ks=(1,), workers=2)
    assert {(o.task_id, o.index): o.status for o in scores.outcomes} == expected
    assert "failed" in expected.values() and scores.unscored == ()


def _problem(task_id: str, test: str) -> Problem:
    return Problem(task_id, prompt="", test=test, entry_point=None, canonical_solution=None, stop=())


def test_pass_at_k_covers_only_the_k_every_scored_problem_has_samples_for():
    problems = [_problem("a", "assert f() == 1"), _problem("b", "assert f() == 2"), _problem("c", "assert f() == 3")]
    returns = {"a": ["1", "1", "0"], "b": ["0", "5"]}  # c has no completions
    completions = {task: [f"def f():\n    return {value}" for value in values] for task, values in returns.items()}
    progress = []
    scores = score_completions(
        problems, completions, ks=(1, 2, 10), workers=2, on_progress=lambda *done_total: progress.append(done_total)
    )
    assert scores.counts == {"a": (3, 2), "b": (2, 0)}
    assert scores.pass_at_k == pytest.approx({1: (2 / 3 + 0) / 2, 2: (1.0 + 0) / 2})
    assert scores.unscored == ("c",)
    assert [(o.task_id, o.index, o.status) for o in scores.outcomes] == [
        ("a", 0, "passed"),
        ("a", 1, "passed"),
        ("a", 2, "failed"),
        ("b", 0, "failed"),
        ("b", 1, "failed"),
    ]
    assert sorted(progress) == [(done, 5) for done in range(1, 6)]


def test_an_mbpp_file_scores_from_its_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    row = {"text": "Add.", "test_list": ["assert add(1, 2) == 3"], "code": "def add(a, b):\n    return a + b"}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (problem,) = load_problems(str(path), **SPLIT)
    scores = score_completions(
        [problem], {problem.task_id: [problem.canonical_solution, "def add(a, b):\n    return a"]}
    )
    assert scores.pass_at_k == {1: 0.5} and scores.counts == {"mine/0": (2, 1)}
