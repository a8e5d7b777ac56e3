"""loss.sequential_heads: the heads one at a time give the joint computation's loss and gradients for every algorithm
and both model kinds, keep no head's logits for backward, and auto turns them on on accelerators only."""

from __future__ import annotations

import copy

import pytest
import torch
from support.recipes import with_sections

from wmtp_core.algorithms.objective import MicroBatch, Objective, algorithm_loss, sequential_heads
from wmtp_core.data.sequences import MTPCollator
from wmtp_core.models.hf import load_hf_mtp_model
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.runtime.devices import DevicePlan

CPU = DevicePlan(device="cpu", autocast_dtype=None, use_grad_scaler=False, num_workers=0, reasons=())
VOCAB = 97


def _micro_batch(lengths: list[int], *, horizon: int, vocab: int = VOCAB, pad_id: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    items = [
        {"tokens": torch.randint(3, vocab, (n,), generator=gen), "reward": float(i % 2)} for i, n in enumerate(lengths)
    ]
    batch = MTPCollator(horizon=horizon, pad_id=pad_id)(items)
    return MicroBatch.from_batch(batch, device="cpu", pad_id=pad_id)


def _loss_and_grads(model, mb, recipe, *, sequential: str, reference=None):
    model = copy.deepcopy(model)
    recipe = with_sections(recipe, loss={"sequential_heads": sequential})
    loss, metrics = algorithm_loss(model, mb, Objective.of(recipe), plan=CPU, reference=reference)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _assert_same(model, mb, recipe, reference=None):
    joint_loss, joint_metrics, joint_grads = _loss_and_grads(model, mb, recipe, sequential="off", reference=reference)
    seq_loss, seq_metrics, seq_grads = _loss_and_grads(model, mb, recipe, sequential="on", reference=reference)
    torch.testing.assert_close(seq_loss, joint_loss, rtol=1e-5, atol=1e-6)
    assert seq_metrics.keys() == joint_metrics.keys()
    for name in joint_metrics:
        torch.testing.assert_close(seq_metrics[name], joint_metrics[name], rtol=1e-5, atol=1e-6)
    assert seq_grads.keys() == joint_grads.keys() and len(joint_grads) == len(list(model.parameters()))
    for name, grad in joint_grads.items():
        torch.testing.assert_close(seq_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


ALGORITHMS = {
    "baseline": {"train": {"algorithm": "baseline-mtp"}},
    "critic": {"train": {"algorithm": "critic-wmtp"}},
    "rho1-weighted": {"train": {"algorithm": "rho1-wmtp"}, "rho1": {"selection_mode": "weighted"}},
    "rho1-token-skip": {"train": {"algorithm": "rho1-wmtp"}, "rho1": {"selection_mode": "token_skip"}},
    "critic-token-mean1-clip": {"train": {"algorithm": "critic-wmtp"}, "loss": {"weight_norm": "token_mean1_clip"}},
}


@pytest.mark.parametrize("sections", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_sequential_heads_give_the_joint_loss_and_gradients(tiny_recipe, sections):
    recipe = with_sections(tiny_recipe, model={"horizon": 3}, **sections)
    torch.manual_seed(0)
    critic = recipe.train.algorithm == "critic-wmtp"
    model = MTPTransformer(recipe.model, vocab_size=VOCAB, with_value_head=critic)
    reference = None
    if recipe.train.algorithm == "rho1-wmtp":
        reference = MTPTransformer(recipe.model, vocab_size=VOCAB).eval().requires_grad_(False)
    _assert_same(model, _micro_batch([20, 13, 7], horizon=3), recipe, reference)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sequential_heads_give_the_joint_loss_and_gradients_on_hf_trunks(tiny_recipe, hf_model_dirs, kind):
    recipe = with_sections(tiny_recipe, model={"horizon": 3}, train={"algorithm": "critic-wmtp"})
    model = load_hf_mtp_model(str(hf_model_dirs[kind]), horizon=3, max_seq_len=64, with_value_head=True)
    for param in model.extra_heads.parameters():  # heads that differ from the last layer they were copied from
        param.data.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    vocab = model.lm.config.vocab_size
    _assert_same(model, _micro_batch([16, 9], horizon=3, vocab=vocab, pad_id=1), recipe)


def _largest_saved_tensor(model, mb, recipe) -> int:
    """The most elements of any tensor autograd keeps for backward during the loss's forward."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        algorithm_loss(model, mb, Objective.of(recipe), plan=CPU)
    return max(sizes)


def test_sequential_heads_keep_no_head_logits_for_backward(tiny_recipe):
    recipe = with_sections(tiny_recipe, model={"horizon": 4})
    model = MTPTransformer(recipe.model, vocab_size=1024)  # logits outweigh every other activation
    mb = _micro_batch([32, 32], horizon=4, vocab=1024)
    one_head_logits = 2 * 32 * 1024
    joint = _largest_saved_tensor(model, mb, with_sections(recipe, loss={"sequential_heads": "off"}))
    sequential = _largest_saved_tensor(model, mb, with_sections(recipe, loss={"sequential_heads": "on"}))
    assert joint >= 4 * one_head_logits  # all heads' log-probabilities at once
    assert sequential < one_head_logits


@pytest.mark.parametrize(
    "setting, device, horizon, expected",
    [
        ("auto", "cuda", 4, True),
        ("auto", "mps", 4, True),
        ("auto", "cpu", 4, False),
        ("auto", "cuda", 1, False),
        ("on", "cpu", 4, True),
        ("off", "cuda", 4, False),
    ],
)
def test_auto_turns_sequential_heads_on_on_accelerators_with_several_heads(
    tiny_recipe, setting, device, horizon, expected
):
    loss = tiny_recipe.loss.model_copy(update={"sequential_heads": setting})
    plan = DevicePlan(device=device, autocast_dtype=None, use_grad_scaler=False, num_workers=0, reasons=())
    assert sequential_heads(loss, plan, horizon=horizon) is expected
