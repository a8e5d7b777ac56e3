"""A fresh AdamW gets its zero state directly, as torch's state-dict API would make it by a zero-gradient step, so a
restore does not allocate a gradient for every parameter first (a third of a rank's training state)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

from wmtp_core.checkpoint.state_dicts import zero_adam_state


def fresh(kind, **options) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    return model, kind(model.parameters(), lr=1e-3, weight_decay=0.1, **options)


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"foreach": False}], ids=["default", "amsgrad", "loop"])
def test_zero_state_is_what_torch_makes_by_a_zero_gradient_step_without_the_step(options):
    ours_model, ours = fresh(torch.optim.AdamW, **options)
    torch_model, theirs = fresh(torch.optim.AdamW, **options)
    zero_adam_state(ours)
    _init_optim_state(theirs)
    assert [p.grad for p in ours_model.parameters()] == [None] * 4  # no gradient was allocated
    for mine, its in zip(ours.state.values(), theirs.state.values(), strict=True):
        assert mine.keys() == its.keys()
        for key in mine:
            assert (mine[key].dtype, mine[key].device, mine[key].shape) == (
                its[key].dtype,
                its[key].device,
                its[key].shape,
            )
        assert (mine["step"].item(), its["step"].item()) == (0, 1)  # torch counts the step it took; a restore sets it
        for key in mine.keys() - {"step"}:
            assert torch.equal(mine[key], its[key]), key
    for mine, its in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.equal(mine, its)  # and no weight decay applied to the weights


def test_an_optimizer_with_state_or_of_another_kind_is_left_to_torch():
    _, sgd = fresh(torch.optim.SGD, momentum=0.9)
    zero_adam_state(sgd)
    assert not sgd.state
    _, adam = fresh(torch.optim.AdamW)
    adam.state[adam.param_groups[0]["params"][0]]["step"] = torch.tensor(5.0)
    zero_adam_state(adam)
    assert len(adam.state) == 1
