"""Every algorithm trains end to end through `wmtp train --set train.algorithm=...` on the built-in data (their
non-default modes are trained in-process in tests/unit/test_algorithms.py)."""

from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "settings",
    [
        ["train.algorithm=critic-wmtp", "critic.pretrain_steps=20"],
        ["train.algorithm=rho1-wmtp", "rho1.reference_steps=20"],
    ],
    ids=["critic", "rho1-weighted"],
)
def test_algorithm_trains_and_eval_loss_falls(tmp_path, tiny_recipe, prefect_api_url, run_wmtp, settings):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe.model_dump(mode="json")))
    overrides = [f"--set={s}" for s in [*settings, "train.max_steps=40", "train.save_every=20", "train.eval_every=20"]]
    summary = run_wmtp(["train", "--recipe", str(recipe), *overrides], home=tmp_path / "home", api_url=prefect_api_url)
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["final_eval_loss"] < 0.85 * summary["initial_eval_loss"]
