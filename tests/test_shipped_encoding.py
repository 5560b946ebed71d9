"""What the shipped models must show about task encoding (fresh prompts, with the step-0 control)."""

from __future__ import annotations

import pytest

import tvlens
from tvlens.models import ALIASES

SEED = 31_337


@pytest.fixture(scope="module")
def default_emergence():
    return tvlens.emergence("default", n_per_task=100, shots=4, seed=SEED, progress=False)


def test_default_model_encodes_the_task_at_an_inner_layer(default_emergence):
    em = default_emergence
    model = tvlens.load_model("default")
    n_layers = model.cfg.n_layers
    last = em.td[-1]
    best = em.best_layer
    assert 0 < best < n_layers, f"best TD layer {best} is not an inner layer (0 and {n_layers} are the ends)"
    assert float(last.max()) >= 0.9, [round(float(v), 3) for v in last]


def test_default_model_step_zero_control_is_near_chance(default_emergence):
    em = default_emergence
    assert em.steps[0] == 0
    chance = 1 / len(em.task_names)
    td0 = float(em.td[0, em.layers.index(em.best_layer)])
    assert td0 <= chance + 0.15, (td0, chance)


def test_default_model_td_rises_with_accuracy(default_emergence):
    em = default_emergence
    assert em.spearman() >= 0.8, em


def test_default_alias_points_at_the_designed_family():
    assert ALIASES["default"] in ("codes", "lookup", "position")
