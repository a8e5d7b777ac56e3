"""wmtp_core.runtime.devices: plan_devices over hand-built probes for every backend and phases.mps setting."""

from __future__ import annotations

import itertools

import pytest
import torch
from support.training import device_plan

from wmtp_core.config import CheckpointConfig, DataConfig, DevicesConfig, PhaseGates, Recipe
from wmtp_core.fixplan.gates import device_policies, resolve_gates
from wmtp_core.runtime.devices import DevicePlan, EnvironmentProbe, autocast_context, probe_environment


def _probe(*, cuda: bool = False, bf16: bool = False, mps: bool = False) -> EnvironmentProbe:
    return EnvironmentProbe(
        torch_version="2.x",
        python_version="3.12",
        platform="test",
        cpu_count=8,
        cuda_available=cuda,
        cuda_device_count=int(cuda),
        cuda_device_name="Fake GPU" if cuda else None,
        cuda_bf16_supported=bf16,
        mps_available=mps,
    )


PROBES = {
    "cuda-bf16": _probe(cuda=True, bf16=True),
    "cuda-no-bf16": _probe(cuda=True),
    "mps": _probe(mps=True),
    "cpu": _probe(),
    "cuda-and-mps": _probe(cuda=True, bf16=True, mps=True),
}


def _plan(probe: EnvironmentProbe, *, backend="auto", precision="auto", workers=2, mps_gate=True) -> DevicePlan:
    return _policy(mps_gate)(
        DevicesConfig(backend=backend, precision=precision), DataConfig(num_workers=workers), probe
    )


def _policy(mps_gate: bool):
    """The device policy the phases.mps gate selects."""
    return device_policies(resolve_gates(PhaseGates(mps=mps_gate), CheckpointConfig()))[0]


@pytest.mark.parametrize(
    ("probe", "device"),
    [("cuda-and-mps", "cuda"), ("cuda-bf16", "cuda"), ("cuda-no-bf16", "cuda"), ("mps", "mps"), ("cpu", "cpu")],
)
@pytest.mark.parametrize("mps_gate", [True, False])
def test_auto_backend_prefers_cuda_then_mps_then_cpu(probe, device, mps_gate):
    assert _plan(PROBES[probe], mps_gate=mps_gate).device == device


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "fp16"])
def test_mps_with_gate_on_runs_fp32_without_autocast_and_no_workers(precision):
    plan = _plan(PROBES["mps"], precision=precision, workers=3)
    assert (plan.device, plan.autocast_dtype, plan.num_workers, plan.use_grad_scaler) == ("mps", None, 0, False)
    assert any("workers 0" in reason for reason in plan.reasons)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")]
)
def test_mps_with_gate_off_uses_configured_autocast_and_workers(precision, dtype):
    plan = _plan(PROBES["mps"], precision=precision, workers=3, mps_gate=False)
    assert (plan.device, plan.autocast_dtype, plan.num_workers) == ("mps", dtype, 3)


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_cuda_uses_bf16_autocast_where_supported(precision):
    plan = _plan(PROBES["cuda-bf16"], precision=precision)
    assert (plan.autocast_dtype, plan.use_grad_scaler, plan.num_workers) == ("bf16", False, 2)


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_cuda_without_bf16_falls_back_to_fp16_with_grad_scaler(precision):
    plan = _plan(PROBES["cuda-no-bf16"], precision=precision)
    assert (plan.autocast_dtype, plan.use_grad_scaler) == ("fp16", True)


def test_cuda_fp16_asked_uses_fp16_with_grad_scaler_even_with_bf16_support():
    plan = _plan(PROBES["cuda-bf16"], precision="fp16")
    assert (plan.autocast_dtype, plan.use_grad_scaler) == ("fp16", True)


def test_cuda_fp32_asked_runs_without_autocast():
    plan = _plan(PROBES["cuda-bf16"], precision="fp32")
    assert (plan.autocast_dtype, plan.use_grad_scaler) == (None, False)


@pytest.mark.parametrize(("precision", "dtype"), [("auto", None), ("fp32", None), ("fp16", None), ("bf16", "bf16")])
def test_cpu_is_fp32_unless_bf16_is_asked(precision, dtype):
    plan = _plan(PROBES["cpu"], precision=precision, workers=1)
    assert (plan.device, plan.autocast_dtype, plan.use_grad_scaler, plan.num_workers) == ("cpu", dtype, False, 1)


@pytest.mark.parametrize(("backend", "probe"), [("cuda", "cpu"), ("cuda", "mps"), ("mps", "cpu"), ("mps", "cuda-bf16")])
@pytest.mark.parametrize("mps_gate", [True, False])
def test_asking_for_a_missing_backend_raises_value_error_naming_the_setting(backend, probe, mps_gate):
    with pytest.raises(ValueError, match="devices.backend"):
        _plan(PROBES[probe], backend=backend, mps_gate=mps_gate)


def test_explicit_cpu_backend_is_honoured_on_a_gpu_machine():
    assert _plan(PROBES["cuda-and-mps"], backend="cpu").device == "cpu"


@pytest.mark.parametrize(
    ("probe", "backend", "precision", "mps_gate"),
    [
        (probe, backend, precision, gate)
        for probe, backend, precision, gate in itertools.product(
            PROBES, ["auto", "cpu"], ["auto", "fp32", "bf16", "fp16"], [True, False]
        )
    ],
)
def test_every_plan_gives_non_empty_reasons(probe, backend, precision, mps_gate):
    plan = _plan(PROBES[probe], backend=backend, precision=precision, mps_gate=mps_gate)
    assert plan.reasons and all(reason.strip() for reason in plan.reasons)


def test_autocast_context_with_no_dtype_is_a_no_op():
    plan = DevicePlan(device="cpu", autocast_dtype=None, use_grad_scaler=False, num_workers=0, reasons=("test",))
    a = torch.randn(4, 4)
    with autocast_context(plan):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32


def test_autocast_context_with_bf16_on_cpu_casts_matmuls():
    plan = DevicePlan(device="cpu", autocast_dtype="bf16", use_grad_scaler=False, num_workers=0, reasons=("test",))
    a = torch.randn(4, 4)
    with autocast_context(plan):
        assert (a @ a).dtype == torch.bfloat16


def test_probe_of_this_machine_plans_without_error():
    probe = probe_environment()
    assert probe.cpu_count >= 1 and probe.to_dict()["torch_version"] == torch.__version__
    assert _plan(probe).device in {"cuda", "mps", "cpu"}


def _recipe(**sections):

    recipe = Recipe()
    return recipe.model_copy(update={k: getattr(recipe, k).model_copy(update=v) for k, v in sections.items()})


def test_mps_with_gate_on_applies_the_mps_profile_fsdp_off_and_accumulation_4():
    recipe = _recipe(devices={"strategy": "fsdp", "nproc_per_node": 2}, data={"num_workers": 4})
    plan = device_plan(recipe, PROBES["mps"])
    adjusted, reasons = _profile_policy(recipe)(recipe, plan)
    assert (adjusted.devices.strategy, adjusted.devices.nproc_per_node, adjusted.data.num_workers) == ("single", 1, 0)
    assert adjusted.train.grad_accumulation_steps == 4 and adjusted.devices.precision == "fp32"
    assert any("devices.strategy 'fsdp' -> 'single'" in reason for reason in reasons)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_mps_plan_says_why_distributed_training_falls_back_to_one_process(strategy):
    devices = DevicesConfig(strategy=strategy, nproc_per_node=2)
    plan = _policy(True)(devices, DataConfig(num_workers=2), PROBES["mps"])
    assert any(f"devices.strategy={strategy}" in reason and "falls back to single" in reason for reason in plan.reasons)
    assert any("mps_optimized.yaml" in reason for reason in plan.reasons)


@pytest.mark.parametrize(("probe", "mps_gate"), [("mps", False), ("cpu", True)])
def test_plans_off_mps_or_with_the_gate_off_keep_the_configured_strategy(probe, mps_gate):
    devices = DevicesConfig(strategy="fsdp", nproc_per_node=2)
    plan = _policy(mps_gate)(devices, DataConfig(num_workers=2), PROBES[probe])
    assert not any("falls back" in reason or "mps_optimized" in reason for reason in plan.reasons)


@pytest.mark.parametrize(("probe", "mps_gate"), [("mps", False), ("cpu", True), ("cuda-bf16", True)])
def test_the_mps_profile_applies_only_on_mps_with_the_gate_on(probe, mps_gate):
    recipe = _recipe(devices={"strategy": "fsdp", "nproc_per_node": 2}, phases={"mps": mps_gate})
    plan = device_plan(recipe, PROBES[probe])
    assert _profile_policy(recipe)(recipe, plan) == (recipe, ())


def test_legacy_cpu_autocast_with_fp32_warns_and_the_fixed_path_does_not(recwarn):
    legacy = _plan(PROBES["cpu"], mps_gate=False)
    fixed = _plan(PROBES["cpu"], mps_gate=True)
    with autocast_context(fixed):
        torch.ones(2, 2) @ torch.ones(2, 2)
    assert not [w for w in recwarn if "autocast" in str(w.message)]
    with pytest.warns(UserWarning, match="In CPU autocast, but the target dtype is not supported"):
        with autocast_context(legacy):
            torch.ones(2, 2) @ torch.ones(2, 2)


def test_training_logs_its_device_plan_with_every_reason(tiny_recipe, tmp_path, caplog):
    from support.training import plan_and_train

    recipe = tiny_recipe.model_copy(update={"train": tiny_recipe.train.model_copy(update={"max_steps": 1})})
    plan = _plan(PROBES["cpu"], workers=0)
    with caplog.at_level("INFO", logger="wmtp_core"):
        plan_and_train(recipe, tmp_path, devices=plan)
    (line,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("device plan:")]
    assert all(reason in line for reason in plan.reasons)


def _profile_policy(recipe):
    return device_policies(resolve_gates(recipe.phases, recipe.checkpoint))[1]
