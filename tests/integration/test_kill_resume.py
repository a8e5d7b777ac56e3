"""SIGKILL never loses work: killed during training or mid-save, the run resumes from a valid checkpoint and ends
with exactly the weights of an uninterrupted run (benchmarks/kill_soak.py runs many more trials)."""

from __future__ import annotations

import random

import pytest

from benchmarks.kill_trials import run_trial, uninterrupted

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    return uninterrupted(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("moment", ["training", "save"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(reference_weights, tmp_path, moment):
    result = run_trial(tmp_path, reference_weights, moment=moment, rng=random.Random(moment))
    assert result.killed_at_step is not None and result.killed_at_step >= 5
    assert result.identical, result
