"""Checkpoint layout, manifest verification, latest-valid selection, pruning, and the phase-gated state dicts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wmtp_core.checkpoint.manifest import (
    MANIFEST_FILE,
    CheckpointError,
    describe_files,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    verify_checkpoint,
)
from wmtp_core.checkpoint.state_dicts import CheckpointSaveError
from wmtp_core.checkpoint.storage import (
    MODEL_FILE,
    STATE_FILE,
    check_shapes_match,
    load_checkpoint,
    make_durable,
    save_checkpoint,
)
from wmtp_core.config import CheckpointConfig, PhaseGates
from wmtp_core.fixplan.gates import behaviours, resolve_gates
from wmtp_core.runtime.distributed import SINGLE


def _save(run_dir, step, value=1.0):
    model_state = {"w": torch.full((2, 3), value)}
    train_state = {"progress": {"step": step}, "rng": torch.get_rng_state()}
    return save_checkpoint(
        run_dir, step=step, model_state=model_state, train_state=train_state, manifest_extra={"recipe": {}}
    )


def _trained_linear():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_directory_holds_weights_state_and_manifest(tmp_path):
    path = _save(tmp_path, 12)
    assert path == tmp_path / "checkpoints" / "step_00000012"
    assert sorted(p.name for p in path.iterdir()) == sorted([MODEL_FILE, STATE_FILE, MANIFEST_FILE])
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["step"] == 12 and set(manifest["files"]) == {MODEL_FILE, STATE_FILE}
    assert torch.equal(load_file(path / MODEL_FILE)["w"], torch.ones(2, 3))
    assert torch.load(path / STATE_FILE, weights_only=True)["progress"]["step"] == 12


def test_no_temporary_directory_is_left_behind(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 1, value=2.0)  # a retried step replaces the old copy
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert names == ["step_00000001"]
    assert torch.equal(load_file(tmp_path / "checkpoints/step_00000001" / MODEL_FILE)["w"], torch.full((2, 3), 2.0))


def test_checkpoint_published_before_its_fsync_is_complete_and_valid(tmp_path):
    path = save_checkpoint(
        tmp_path,
        step=3,
        model_state={"w": torch.ones(2)},
        train_state={"progress": {"step": 3}},
        manifest_extra={},
        durable=False,
    )
    assert verify_checkpoint(path)["step"] == 3  # visible and verified at once; durability follows
    make_durable(path)
    assert latest_valid_checkpoint(tmp_path).path == path


def test_retried_step_replaces_the_old_checkpoint(tmp_path):
    _save(tmp_path, 5, value=1.0)
    path = _save(tmp_path, 5, value=2.0)
    assert torch.equal(load_file(path / MODEL_FILE)["w"], torch.full((2, 3), 2.0))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]


def test_tampered_file_is_detected_and_skipped_for_latest(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    with (newest / MODEL_FILE).open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    infos = list_checkpoints(tmp_path)
    assert [(i.step, i.valid) for i in infos] == [(1, True), (2, False)]
    assert latest_valid_checkpoint(tmp_path).step == 1
    with pytest.raises(CheckpointError, match=MODEL_FILE):
        load_checkpoint(newest)


def test_checkpoint_pruned_while_being_listed_is_invalid_not_an_error(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / MODEL_FILE).unlink()  # what a concurrent prune in another process leaves for a moment
    assert [(i.step, i.valid) for i in list_checkpoints(tmp_path)] == [(1, True), (2, False)]
    assert latest_valid_checkpoint(tmp_path).step == 1


def test_directory_without_manifest_does_not_count(tmp_path):
    _save(tmp_path, 1)
    half_written = tmp_path / "checkpoints" / "step_00000005"
    half_written.mkdir()
    (half_written / MODEL_FILE).write_bytes(b"partial")
    assert latest_valid_checkpoint(tmp_path).step == 1
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(half_written)


def test_no_checkpoint_means_latest_is_none(tmp_path):
    assert latest_valid_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest_valid_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep_last=2).removed
    assert [p.name for p in removed] == ["step_00000001", "step_00000002"]
    assert [i.step for i in list_checkpoints(tmp_path)] == [3, 4]


def test_train_state_with_a_pickle_payload_is_refused_and_not_run(tmp_path):
    path = _save(tmp_path, 1)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"evil": Payload()}, path / STATE_FILE)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"] = {k: v for k, v in describe_files(path).items() if k != MANIFEST_FILE}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_from_another_model_shape_names_the_tensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"w \(2, 3\) vs model \(4, 3\)"):
        check_shapes_match({"w": torch.zeros(2, 3)}, {"w": torch.zeros(4, 3)}, source=tmp_path)


def _state_dicts(**gates):
    """The state-dict API the phase gates select."""
    return behaviours(resolve_gates(PhaseGates(**gates), CheckpointConfig())).state_dicts


def test_legacy_gate_fails_on_a_plain_module_with_keyerror_none():
    model, optimizer = _trained_linear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(CheckpointSaveError, match=r"KeyError\(None\)") as caught:
            _state_dicts(checkpoint=False).gather(model, optimizer, SINGLE)
    assert isinstance(caught.value.__cause__, KeyError)


@pytest.mark.parametrize("saved_with_api", [True, False])
@pytest.mark.parametrize("loaded_with_api", [True, False])
def test_state_saved_by_either_api_gate_restores_under_either(saved_with_api, loaded_with_api):
    model, optimizer = _trained_linear()
    model_state, optim_state = _state_dicts(api=saved_with_api).gather(model, optimizer, SINGLE)
    assert set(optim_state["state"]) == {name for name, _ in model.named_parameters()}  # keyed by name
    fresh_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=0.1)
    _state_dicts(api=loaded_with_api).restore(fresh_model, fresh_optimizer, model_state, optim_state, SINGLE)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg"], fresh_optimizer.state[b]["exp_avg"])


def _anonymous_memory_kib() -> int:
    """This process's resident anonymous memory (what a copy into memory adds; a file's mapped pages are not)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_a_checkpoint_loads_as_maps_of_its_files_not_copies(tmp_path):
    big = torch.randn(8 * 2**20)  # 32 MiB in each file
    path = save_checkpoint(
        tmp_path, step=1, model_state={"w": big}, train_state={"optimizer": {"m": big}}, manifest_extra={}
    )
    del big
    before = _anonymous_memory_kib()
    model_state, train_state, _ = load_checkpoint(path, verified=True)
    grown_mib = (_anonymous_memory_kib() - before) / 1024
    assert grown_mib < 8, f"loading copied {grown_mib:.0f} MiB into memory"
    assert model_state["w"].shape == train_state["optimizer"]["m"].shape == (8 * 2**20,)
