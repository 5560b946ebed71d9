"""The shipped trained models reach their accuracy bars on fresh prompts (seeds never used in training)."""

from __future__ import annotations

import pytest

import tvlens

FRESH_SEED = 987_654  # training batches use seeds seed*7919993 + step + 1, evaluation 1000003 + seed

BARS = {"bitwise": 0.95, "categories": 0.98, "codes": 0.95}


@pytest.mark.parametrize("name", sorted(BARS))
def test_shipped_model_accuracy_on_fresh_prompts(name):
    model = tvlens.load_model(name)
    info = tvlens.model_info(model)
    assert info.family["name"] == name and info.step > 0
    assert "tvlens train" in info.command or info.command.startswith("tvlens.train(TrainConfig(")
    fam = info.task_family()
    prompts = fam.sample(100, shots=4, seed=FRESH_SEED)
    acc = tvlens.icl_accuracy(model, prompts)
    for task, value in acc.per_task.items():
        if task != "null":
            assert value >= BARS[name], (name, task, value)


@pytest.mark.parametrize("name", sorted(BARS))
def test_shipped_models_start_untrained_at_step_zero(name):
    steps = tvlens.checkpoint_steps(name)
    assert steps[0] == 0 and len(steps) >= 8
    model = tvlens.load_model(name, step=0)
    fam = tvlens.model_info(model).task_family()
    acc = tvlens.icl_accuracy(model, fam.sample(30, shots=4, seed=FRESH_SEED))
    assert acc.mean < 0.3


def test_default_is_a_shipped_model():
    assert tvlens.model_info(tvlens.load_model("default")).family["name"] in BARS
