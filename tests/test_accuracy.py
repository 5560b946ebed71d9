"""icl_accuracy: exact match with teacher forcing equals greedy generation of the whole answer."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.errors import ConfigError
from tvlens.models import build_model


@torch.no_grad()
def test_exact_match_equals_greedy_generation_on_the_shipped_bitwise_model():
    model = tvlens.load_model("bitwise")
    fam = tvlens.model_info(model).task_family()
    prompts = fam.sample(6, shots=4, seed=2024)  # null prompts included: some answers are wrong
    acc = tvlens.icl_accuracy(model, prompts)
    verdicts = []
    for i in range(len(prompts)):
        q = int(prompts.query_pos[i])
        out = prompts.tokens[i : i + 1, : q + 1]
        for _ in range(prompts.n_answer):  # greedy decoding, one token at a time
            out = torch.cat([out, model(out)[:, -1:].argmax(-1)], 1)
        verdicts.append(torch.equal(out[0, q + 1 :], prompts.answers[i]))
    assert acc.per_prompt.bool().tolist() == verdicts
    assert any(verdicts)


def test_accuracy_result_table_and_regression_mse():
    fam = tasks.get("sparse_regression_small", noise_std=0.0)
    model = build_model(fam, n_layers=1, d_model=16, n_heads=2, shots=9)
    p = fam.sample(5, shots=9, seed=0)
    acc = tvlens.icl_accuracy(model, p)
    out = model(p.inputs)[torch.arange(len(p)), p.query_pos, 0]
    assert torch.allclose(acc.per_prompt, (out - p.answers[:, 0]) ** 2, atol=1e-5)
    df = acc.to_dataframe()
    assert list(df.columns) == ["task", "n", "mse", "mse_lo", "mse_hi", "least_squares_mse", "basis_aware_mse"]
    assert acc.plot().data


def test_prompts_that_do_not_fit_the_model():
    model = build_model("shift", n_layers=1, d_model=16, n_heads=2)
    with pytest.raises(ConfigError, match="context is"):
        tvlens.icl_accuracy(model, tasks.get("shift").sample(1, shots=10, seed=0))
    with pytest.raises(ConfigError, match="continuous"):
        tvlens.icl_accuracy(model, tasks.get("sparse_regression_small").sample(1, shots=2, seed=0))
