"""Two CPU processes under torchrun (gloo): DDP and FSDP2 train, save full and sharded checkpoints, and resume on two
processes or on one with the same loss trajectory, weights and tokens_seen (all ranks' tokens) as an uninterrupted
run.

The global batch is the same everywhere: 2 processes x 1 micro-batch, or 1 process x 2 accumulated micro-batches.
Every torchrun call is bounded by a subprocess timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.checkpoints import copy_run_up_to, full_model_state
from support.recipes import TINY_OVERRIDES
from support.torchrun import torchrun_worker
from support.training import plan_and_train

from wmtp_core.recipes import load_recipe
from wmtp_core.training.worker import METRICS_PREFIX

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # every torchrun job takes 5-30 s here
STEPS = ["train.max_steps=6", "train.save_every=2", "train.keep_last=10", "train.eval_every=100", "train.log_every=1"]
LAYOUTS = {
    "ddp": ["devices.strategy=ddp"],
    "fsdp": ["devices.strategy=fsdp"],
    "fsdp-sharded": ["devices.strategy=fsdp", "checkpoint.format=sharded"],
    "fsdp1-legacy-api": ["devices.strategy=fsdp", "phases.api=false"],  # FSDP1 + FSDP.state_dict_type
}


def two_process_recipe(layout: str, *extra: str):
    return load_recipe(
        None, [*TINY_OVERRIDES, *STEPS, *LAYOUTS[layout], "devices.nproc_per_node=2", "devices.timeout_s=60", *extra]
    )


def torchrun(recipe, run_dir: Path, *, resume: str | None = None) -> tuple[dict, dict[int, float]]:
    """Run the worker on 2 processes; return rank 0's outcome and its loss per step."""
    outcome, reports = torchrun_reports(recipe, run_dir, resume=resume)
    return outcome, losses_of(reports)


def losses_of(reports: list[dict]) -> dict[int, float]:
    """The training loss per step among metric reports ({"step", "metrics"})."""
    return {r["step"]: r["metrics"]["loss"] for r in reports if "loss" in r["metrics"]}


def torchrun_reports(recipe, run_dir: Path, *, resume: str | None = None) -> tuple[dict, list[dict]]:
    """Run the worker on 2 processes; return rank 0's outcome and its metric reports ({"step", "metrics"})."""
    out, outcome = torchrun_worker(recipe, run_dir, resume=resume, timeout=180)
    reports = [
        json.loads(line[len(METRICS_PREFIX) :]) for line in out.stdout.splitlines() if line.startswith(METRICS_PREFIX)
    ]
    return outcome, reports


def final_weights(run_dir: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return full_model_state(run_dir / "checkpoints" / f"step_{step:08d}")


def tokens_seen(run_dir: Path, step: int = 6) -> int:
    """The tokens_seen a checkpoint saved (train_state.pt's progress)."""
    state_file = run_dir / "checkpoints" / f"step_{step:08d}" / "train_state.pt"
    return torch.load(state_file, weights_only=True)["progress"]["tokens_seen"]


# Measured here (torch 2.15, CPU gloo): FSDP1's FSDP.optim_state_dict with use_orig_params=True returns each
# parameter's exp_avg_sq in place of its exp_avg, so the legacy path (phases.api off) resumes with a corrupted
# AdamW state; one more reason for Phase 3. Strict: these tests start failing the day torch fixes it.
LEGACY_OPTIMIZER_BUG = pytest.mark.xfail(strict=True, reason="torch FSDP1 optim_state_dict swaps exp_avg on CPU")


def resume_marks(layout: str, mark=LEGACY_OPTIMIZER_BUG):
    return pytest.param(layout, marks=mark) if layout == "fsdp1-legacy-api" else layout


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    worst = max(float((expected[k] - actual[k]).abs().max()) for k in expected)
    assert worst < 1e-5, f"weights differ by up to {worst}"


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted 2-process runs, one per layout, made on first use and shared by the module's tests."""
    runs = {}

    def get(layout: str) -> tuple[Path, dict[int, float]]:
        if layout not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight-{layout}")
            outcome, losses = torchrun(two_process_recipe(layout), run_dir)
            assert outcome["ok"] and outcome["result"]["steps"] == 6
            runs[layout] = run_dir, losses
        return runs[layout]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_process_run_saves_every_interval(straight_runs, layout):
    run_dir, losses = straight_runs(layout)
    manifests = [
        json.loads((d / "manifest.json").read_text()) for d in sorted((run_dir / "checkpoints").glob("step_*"))
    ]
    assert [m["step"] for m in manifests] == [2, 4, 6]
    assert {m["world_size"] for m in manifests} == {2}
    assert {m["format"] for m in manifests} == {"sharded" if layout.endswith("sharded") else "full"}
    assert {m["recipe"]["phases"]["api"] for m in manifests} == {layout != "fsdp1-legacy-api"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_on_two_processes_matches_the_uninterrupted_run(straight_runs, layout, tmp_path):
    straight_dir, straight_losses = straight_runs(layout)
    copy_run_up_to(straight_dir, tmp_path, step=4)
    outcome, losses = torchrun(two_process_recipe(layout), tmp_path, resume="latest")
    assert outcome["result"]["resumed_from_step"] == 4  # every layout resumes (FSDP1 once hung in the pre-load check)
    assert losses.keys() == {5, 6}
    if layout == "fsdp1-legacy-api":
        expected = {s: straight_losses[s] for s in (5, 6)}
        assert losses != pytest.approx(expected, rel=1e-5), "torch's FSDP1 defect is gone: drop this branch"
        pytest.xfail(LEGACY_OPTIMIZER_BUG.kwargs["reason"])
    assert losses == pytest.approx({s: straight_losses[s] for s in (5, 6)}, rel=1e-5)
    assert_same_weights(final_weights(straight_dir), final_weights(tmp_path))


@pytest.mark.parametrize("layout", [resume_marks(layout) for layout in LAYOUTS])
def test_resume_on_one_process_matches_the_uninterrupted_run(straight_runs, layout, tmp_path):
    straight_dir, straight_losses = straight_runs(layout)
    copy_run_up_to(straight_dir, tmp_path, step=4)
    recipe = two_process_recipe(
        layout, "devices.strategy=single", "devices.nproc_per_node=1", "train.grad_accumulation_steps=2"
    )
    losses = {}
    result = plan_and_train(
        recipe,
        tmp_path,
        resume_from=tmp_path / "checkpoints" / "step_00000004",
        on_metrics=lambda step, metrics: losses.update({step: metrics["loss"]}) if "loss" in metrics else None,
    )
    assert result.resumed_from_step == 4 and result.steps == 6
    assert tokens_seen(tmp_path) == tokens_seen(straight_dir)  # a count of all ranks' tokens goes on at 1 process
    assert losses == pytest.approx({s: straight_losses[s] for s in (5, 6)}, rel=1e-5)
    assert_same_weights(final_weights(straight_dir), final_weights(tmp_path))


def test_async_sharded_save_on_two_processes_writes_what_a_sync_save_writes(straight_runs, tmp_path):
    """The background write's collectives run on a process group of their own, so they cannot deadlock against
    training's; its shards are a snapshot, so every checkpoint equals the synchronous run's."""
    straight_dir, straight_losses = straight_runs("fsdp-sharded")
    outcome, losses = torchrun(two_process_recipe("fsdp-sharded", "checkpoint.async_save=true"), tmp_path)
    assert outcome["ok"] and losses == pytest.approx(straight_losses, rel=1e-6)
    for step in (2, 4, 6):
        assert_same_weights(final_weights(straight_dir, step), final_weights(tmp_path, step))


def test_one_process_with_accumulation_matches_two_process_ddp_and_fsdp(straight_runs, tmp_path):
    ddp_dir, ddp_losses = straight_runs("ddp")
    fsdp_dir, fsdp_losses = straight_runs("fsdp")
    recipe = load_recipe(None, [*TINY_OVERRIDES, *STEPS, "train.grad_accumulation_steps=2"])
    losses = {}
    plan_and_train(
        recipe,
        tmp_path,
        on_metrics=lambda step, metrics: losses.update({step: metrics["loss"]}) if "loss" in metrics else None,
    )
    assert losses == pytest.approx(ddp_losses, rel=1e-5) and losses == pytest.approx(fsdp_losses, rel=1e-5)
    assert_same_weights(final_weights(ddp_dir), final_weights(tmp_path))
    assert_same_weights(final_weights(fsdp_dir), final_weights(tmp_path))


CRITIC = ["train.algorithm=critic-wmtp", "critic.pretrain_steps=3", "critic.pretrain_patience=10"]


def test_critic_on_two_processes_matches_one_process_with_accumulation(tmp_path):
    """Stage 1 (the value head alone, the trunk frozen) and Stage 2 on DDP and FSDP2: the value pretraining loss,
    the loss trajectory and the final weights, value head included, equal one process's with the same global batch."""
    recipe = load_recipe(None, [*TINY_OVERRIDES, *STEPS, *CRITIC, "train.grad_accumulation_steps=2"])
    expected = []
    plan_and_train(
        recipe,
        tmp_path / "single",
        on_metrics=lambda step, metrics: expected.append({"step": step, "metrics": metrics}),
    )
    stage1 = {k: v for r in expected for k, v in r["metrics"].items() if k.startswith("value_pretrain")}
    losses = losses_of(expected)
    assert stage1["value_pretrain_steps"] == 3.0 and sorted(losses) == [1, 2, 3, 4, 5, 6]
    for layout in ("ddp", "fsdp"):
        outcome, reports = torchrun_reports(two_process_recipe(layout, *CRITIC), tmp_path / layout)
        assert outcome["ok"] and outcome["result"]["steps"] == 6, layout
        assert {k: v for r in reports for k, v in r["metrics"].items() if k in stage1} == pytest.approx(
            stage1, rel=1e-5
        )
        assert losses_of(reports) == pytest.approx(losses, rel=1e-5)
        weights = final_weights(tmp_path / layout)
        assert any(name.startswith("value_head.") for name in weights)
        assert_same_weights(final_weights(tmp_path / "single"), weights)
