"""train.activation_checkpointing and train.compile: per-block features that change how the blocks compute, never
what: checkpointing gives bitwise the same training, keeps less for backward and leaves checkpoints unchanged;
compile matches eager within float tolerance."""

from __future__ import annotations

import pytest
import torch
from support.recipes import with_sections
from support.training import device_plan

from wmtp_core.algorithms.objective import MicroBatch, Objective, algorithm_loss
from wmtp_core.models.hf import load_hf_mtp_model
from wmtp_core.recipes import load_recipe
from wmtp_core.runtime.blocks import wrap_block_forwards
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import train_step
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts


def _batches(parts, count: int) -> list[dict]:
    stream = batch_stream(parts, TrainState())
    batches = [next(stream) for _ in range(count)]
    stream.close()
    return batches


def _train(recipe, *, steps: int, same_batch: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of `steps` optimizer steps on the run's first batches (or its first batch again and again), and the
    weights after them."""
    plan = device_plan(recipe, probe_environment())
    torch.manual_seed(recipe.seed)
    parts = build_run_parts(recipe, plan)
    batches = _batches(parts, 1) * steps if same_batch else _batches(parts, steps)
    state, stream = TrainState(), iter(batches)
    losses = [train_step(parts, stream, state=state, recipe=recipe, plan=plan)["loss"] for _ in batches]
    return losses, {name: p.detach().clone() for name, p in parts.model.named_parameters()}


def test_activation_checkpointing_gives_bitwise_the_same_losses_over_20_steps(tiny_recipe):
    recipe = with_sections(tiny_recipe, model={"dropout": 0.0})
    plain_losses, plain_weights = _train(recipe, steps=20)
    losses, weights = _train(with_sections(recipe, train={"activation_checkpointing": "blocks"}), steps=20)
    assert losses == plain_losses and plain_losses[-1] < plain_losses[0]
    assert weights.keys() == plain_weights.keys()  # names (and so checkpoints) unchanged
    assert all(torch.equal(weights[name], plain_weights[name]) for name in weights)


def _saved_bytes(model, mb, recipe, plan) -> int:
    """Bytes autograd keeps for backward during the loss's forward (a checkpointed block keeps only its input)."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        algorithm_loss(model, mb, Objective.of(recipe), plan=plan)
    return total[0]


def test_checkpointed_blocks_keep_a_fraction_of_the_activations(tiny_recipe):
    recipe = with_sections(tiny_recipe, model={"num_layers": 4})
    plan = device_plan(recipe, probe_environment())
    parts = build_run_parts(recipe, plan)
    mb = MicroBatch.from_batch(_batches(parts, 1)[0], device="cpu", pad_id=parts.pad_id)
    plain = _saved_bytes(parts.model, mb, recipe, plan)
    wrap_block_forwards(parts.model.transformer_blocks(), checkpointed=True, compiled=False)
    assert _saved_bytes(parts.model, mb, recipe, plan) < 0.3 * plain


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_checkpointed_hf_decoder_layers_give_bitwise_the_same_gradients(hf_model_dirs, kind):
    tokens_BT = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = load_hf_mtp_model(str(hf_model_dirs[kind]), horizon=2, max_seq_len=64)
        blocks = model.transformer_blocks()
        assert len(blocks) == model.lm.config.num_hidden_layers + 1  # the LM's layers and the extra head
        wrap_block_forwards(blocks, checkpointed=checkpointed, compiled=False)
        model(tokens_BT).float().pow(2).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


@pytest.mark.slow  # inductor compiles C++ kernels: about 10 s warm, 35-70 s with an empty compile cache on 2 cores
def test_compiled_blocks_match_eager_within_tolerance(tiny_recipe):
    recipe = with_sections(tiny_recipe, train={"activation_checkpointing": "blocks"})
    # One batch shape throughout, so torch.compile traces once (a second shape would trace again, dynamic).
    eager_losses, eager_weights = _train(recipe, steps=3, same_batch=True)
    torch._dynamo.reset()
    losses, weights = _train(with_sections(recipe, train={"compile": True}), steps=3, same_batch=True)
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    worst = max(float((weights[name] - eager_weights[name]).abs().max()) for name in weights)
    assert worst < 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile


def test_activation_checkpointing_none_can_be_set_with_an_override():
    """--set parses `none` as null; the key takes it for its choice of that name."""
    assert load_recipe(None, ["train.activation_checkpointing=none"]).train.activation_checkpointing == "none"


@pytest.mark.gpu
def test_every_feature_together_trains_on_cuda_like_plain_bf16(tiny_recipe):
    recipe = with_sections(tiny_recipe, devices={"backend": "cuda", "precision": "bf16"})
    plain_losses, _ = _train(with_sections(recipe, loss={"sequential_heads": "off"}), steps=3, same_batch=True)
    torch._dynamo.reset()
    features = {"activation_checkpointing": "blocks", "compile": True}
    losses, _ = _train(with_sections(recipe, loss={"sequential_heads": "on"}, train=features), steps=3, same_batch=True)
    assert losses == pytest.approx(plain_losses, rel=2e-2)  # bf16 rounding, in a different order
