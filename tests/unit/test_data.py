"""wmtp_core.data.sequences and wmtp_core.models.tokenizer: records, training text, splits, batch order and MTP
labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core.data.records import DataError, Record, builtin_dataset_path, format_example, load_records, split_records
from wmtp_core.data.sequences import (
    IGNORE_INDEX,
    MTPCollator,
    TokenSequences,
    epoch_batches,
    make_loader,
    mtp_labels,
)
from wmtp_core.models.tokenizer import ByteTokenizer

GOOD = {"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b", "test_list": ["assert add(1, 2) == 3"]}


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _records(n: int) -> list[Record]:
    return [
        Record(text=f"problem {i}", code=f"def f{i}(): pass", test_list=(f"assert f{i}() is None",)) for i in range(n)
    ]


def test_byte_tokenizer_round_trips_unicode_text():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🐍\n\tx = 1"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_byte_tokenizer_wraps_bos_and_eos():
    tok = ByteTokenizer()
    ids = tok.encode("ab")
    assert ids == [tok.bos_id, ord("a"), ord("b"), tok.eos_id]
    assert tok.encode("ab", add_special=False) == [ord("a"), ord("b")]
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and min(tok.pad_id, tok.bos_id, tok.eos_id) >= 256


def test_load_records_reads_fields_and_defaults(tmp_path):
    wrong = {**GOOD, "is_correct": False}
    records = load_records(_jsonl(tmp_path, [json.dumps(GOOD), "", json.dumps(wrong)]))
    assert [r.is_correct for r in records] == [True, False]
    assert [r.reward for r in records] == [1.0, 0.0]
    assert records[0].code == GOOD["code"] and records[0].test_list == tuple(GOOD["test_list"])


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"text": "x", "code": ',
        '["not", "an", "object"]',
        json.dumps({"text": "x", "test_list": []}),
        json.dumps({**GOOD, "code": 3}),
        json.dumps({**GOOD, "test_list": "assert True"}),
        json.dumps({**GOOD, "is_correct": "yes"}),
        json.dumps({**GOOD, "is_correct": 1}),
        json.dumps({**GOOD, "reward": "high"}),
    ],
)
def test_malformed_line_error_names_file_and_line_number(tmp_path, bad_line):
    # A blank line before the bad one: line numbers count physical lines, not records.
    path = _jsonl(tmp_path, [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert f"{path}:3" in str(caught.value)


def test_missing_code_error_names_the_field(tmp_path):
    with pytest.raises(DataError, match="'code'"):
        load_records(_jsonl(tmp_path, [json.dumps({"text": "x", "test_list": []})]))


def test_missing_and_empty_data_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no records"):
        load_records(_jsonl(tmp_path, ["", "  "]))


def test_format_example_contains_problem_tests_and_code_solution():
    record = Record(
        text="Reverse a string.", code="def rev(s):\n    return s[::-1]", test_list=("assert rev('ab') == 'ba'",)
    )
    text = format_example(record)
    assert record.text in text
    assert record.code in text
    assert record.test_list[0] in text
    assert text.index(record.text) < text.index(record.code)


def test_token_sequences_train_on_the_code_solution():
    record = _records(1)[0]
    tok = ByteTokenizer()
    tokens = TokenSequences([record], tok, max_len=10_000)[0]["tokens"].tolist()
    assert record.code in tok.decode(tokens)


def test_split_records_is_deterministic_disjoint_and_covers_all():
    records = _records(50)
    train, held = split_records(records, eval_fraction=0.2, seed=3)
    again = split_records(records, eval_fraction=0.2, seed=3)
    assert (train, held) == again
    assert len(held) == 10
    assert {r.text for r in train}.isdisjoint({r.text for r in held})
    assert sorted(r.text for r in train + held) == sorted(r.text for r in records)


def test_split_records_depends_on_the_seed():
    records = _records(50)
    assert split_records(records, eval_fraction=0.2, seed=1)[1] != split_records(records, eval_fraction=0.2, seed=2)[1]


def test_split_of_too_few_records_raises_data_error():
    with pytest.raises(DataError, match="eval_fraction"):
        split_records(_records(1), eval_fraction=0.1, seed=0)


def test_epoch_batches_are_deterministic_by_seed_and_epoch():
    assert epoch_batches(20, batch_size=4, seed=1, epoch=0) == epoch_batches(20, batch_size=4, seed=1, epoch=0)
    assert epoch_batches(20, batch_size=4, seed=1, epoch=0) != epoch_batches(20, batch_size=4, seed=1, epoch=1)
    assert epoch_batches(20, batch_size=4, seed=1, epoch=0) != epoch_batches(20, batch_size=4, seed=2, epoch=0)


@pytest.mark.parametrize(("num_examples", "batch_size", "num_batches"), [(10, 3, 3), (9, 3, 3), (4, 4, 1), (7, 1, 7)])
def test_epoch_batches_drop_only_the_last_partial_batch(num_examples, batch_size, num_batches):
    batches = epoch_batches(num_examples, batch_size=batch_size, seed=0, epoch=0)
    flat = [i for batch in batches for i in batch]
    assert len(batches) == num_batches
    assert all(len(batch) == batch_size for batch in batches)
    assert len(set(flat)) == len(flat) == num_batches * batch_size
    assert set(flat) <= set(range(num_examples))


def test_epoch_batches_with_fewer_examples_than_a_batch_raise_data_error():
    with pytest.raises(DataError, match="data.batch_size"):
        epoch_batches(3, batch_size=4, seed=0, epoch=0)


def test_collator_labels_match_hand_computed_example():
    items = [
        {"tokens": torch.tensor([10, 11, 12, 13]), "reward": 1.0},
        {"tokens": torch.tensor([20, 21]), "reward": 0.0},
    ]
    batch = MTPCollator(horizon=2, pad_id=99)(items)
    I = IGNORE_INDEX  # noqa: E741
    assert batch["tokens"].tolist() == [[10, 11, 12, 13], [20, 21, 99, 99]]
    assert batch["labels"].tolist() == [
        [[11, 12], [12, 13], [13, I], [I, I]],
        [[21, I], [I, I], [I, I], [I, I]],
    ]
    assert batch["rewards"].tolist() == [1.0, 0.0]
    assert batch["labels"].shape == (2, 4, 2)


def test_labels_are_ignore_index_past_sequence_end_and_on_padding():
    tokens_BT = torch.tensor([[1, 2, 3, 0, 0]])
    labels_BTK = mtp_labels(tokens_BT, torch.tensor([3]), horizon=3)
    assert (labels_BTK[0, 2:] == IGNORE_INDEX).all()
    assert labels_BTK[0, 0].tolist() == [2, 3, IGNORE_INDEX]
    assert not (labels_BTK == 0).any()


def _naive_labels(tokens: list[list[int]], lengths: list[int], horizon: int) -> list[list[list[int]]]:
    T = len(tokens[0])
    return [
        [[tokens[b][t + k + 1] if t + k + 1 < lengths[b] else IGNORE_INDEX for k in range(horizon)] for t in range(T)]
        for b in range(len(tokens))
    ]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=4),
    horizon=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_collator_labels_match_naive_loop(lengths, horizon, seed):
    gen = torch.Generator().manual_seed(seed)
    items = [{"tokens": torch.randint(0, 50, (n,), generator=gen), "reward": 1.0} for n in lengths]
    batch = MTPCollator(horizon=horizon, pad_id=55)(items)
    tokens = batch["tokens"].tolist()
    assert batch["labels"].tolist() == _naive_labels(tokens, lengths, horizon)
    assert all(row[n:] == [55] * (len(row) - n) for row, n in zip(tokens, lengths))


def test_builtin_dataset_has_a_few_hundred_correct_and_incorrect_records():
    records = load_records(builtin_dataset_path())
    assert 200 <= len(records) <= 1000
    assert {r.is_correct for r in records} == {True, False}
    assert all(r.code.strip() and r.text.strip() for r in records)


def test_make_loader_yields_exactly_the_given_batches_in_order():
    tok = ByteTokenizer()
    records = _records(6)
    dataset = TokenSequences(records, tok, max_len=64)
    batches = [[4, 1], [0, 5], [3, 2]]
    loader = make_loader(dataset, batches, MTPCollator(horizon=2, pad_id=tok.pad_id), num_workers=0)
    seen = [[tok.decode(row.tolist()) for row in batch["tokens"]] for batch in loader]
    assert seen == [[format_example(records[i]) for i in batch] for batch in batches]


def test_token_sequences_truncate_to_max_len():
    dataset = TokenSequences(_records(2), ByteTokenizer(), max_len=8)
    assert all(len(dataset[i]["tokens"]) == 8 for i in range(len(dataset)))
