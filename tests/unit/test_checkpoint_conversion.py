"""Converting a sharded checkpoint to the full format through a memory-mapped scratch file: the same tensors as
torch.distributed.checkpoint's own consolidation, without a copy of the state in memory, with its progress."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.training import plan_and_train
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from wmtp_core.checkpoint.conversion import convert_to_full, gather_mapped
from wmtp_core.checkpoint.manifest import CheckpointError
from wmtp_core.checkpoint.storage import SHARDED_DIR, load_checkpoint, single_process_is_intended
from wmtp_core.layout import step_dir_name


def _sharded_run(recipe, run_dir) -> Path:
    recipe = recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"format": "sharded"})})
    plan_and_train(recipe, run_dir)
    return run_dir / "checkpoints" / step_dir_name(4)


def _assert_same_tree(expected, actual, where="") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            _assert_same_tree(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            _assert_same_tree(a, b, f"{where}[{index}]")
    else:
        assert expected == actual, where


def test_conversion_writes_what_torch_distributed_checkpoint_consolidates(tmp_path, tiny_recipe):
    step = _sharded_run(tiny_recipe, tmp_path)
    dcp_to_torch_save(step / SHARDED_DIR, tmp_path / "reference.pt")
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    reports = []
    converted = convert_to_full(step, tmp_path, on_progress=lambda done, total: reports.append((done, total)))
    model_state, train_state, manifest = load_checkpoint(converted)
    assert manifest["format"] == "full" and not (step / SHARDED_DIR).exists()
    _assert_same_tree(reference["model"], model_state)
    _assert_same_tree(reference["optimizer"], train_state["optimizer"])
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert reports[-1][0] == reports[-1][1] == reports[0][1] > 0


def _anonymous_memory_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_gathering_shards_maps_a_scratch_file_instead_of_filling_memory(tmp_path):
    state = {"model": {"w": torch.randn(8 * 2**20)}, "optimizer": {"state": {"w": {"exp_avg": torch.randn(8 * 2**20)}}}}
    with single_process_is_intended():
        dcp.save(state, checkpoint_id=tmp_path / "sharded", no_dist=True)
    del state
    before = _anonymous_memory_kib()
    gathered = gather_mapped(tmp_path / "sharded", tmp_path / "scratch")
    grown_mib = (_anonymous_memory_kib() - before) / 1024
    assert grown_mib < 16, f"gathering 64 MiB of shards kept {grown_mib:.0f} MiB in memory"
    assert gathered["model"]["w"].shape == gathered["optimizer"]["state"]["w"]["exp_avg"].shape == (8 * 2**20,)
    model_only = gather_mapped(tmp_path / "sharded", tmp_path / "scratch-model", only="model")
    assert set(model_only) == {"model"} and torch.equal(model_only["model"]["w"], gathered["model"]["w"])
    assert (tmp_path / "scratch").stat().st_size >= 64 * 2**20


def test_a_full_format_checkpoint_is_refused_before_anything_is_hashed(tmp_path, tiny_recipe):
    plan_and_train(tiny_recipe, tmp_path)
    step = tmp_path / "checkpoints" / step_dir_name(4)
    reports = []
    with pytest.raises(CheckpointError, match="already in the full format"):
        convert_to_full(step, tmp_path, on_progress=lambda done, total: reports.append(done))
    assert reports == [] and load_checkpoint(step)[2]["format"] == "full"
